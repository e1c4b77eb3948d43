from model_service.cli import main

main()
