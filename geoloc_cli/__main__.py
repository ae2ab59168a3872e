from geoloc_cli.cli import main

main()
