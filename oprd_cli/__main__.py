from oprd_cli.cli import main

main()
