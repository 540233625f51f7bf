from dpa_cli.cli.app import main

main()
