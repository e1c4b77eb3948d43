import sys

from model_service.cli import main

sys.exit(main())
