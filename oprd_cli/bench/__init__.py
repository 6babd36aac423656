"""`oprd bench`: measurements of the real teacher pass (`cache`) and the real training step (`loss`)."""
