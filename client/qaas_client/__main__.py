from qaas_client.cli import main

main()
