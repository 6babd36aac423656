"""The embedded toy task used by ``oprd demo``: task generator and cached assets."""
