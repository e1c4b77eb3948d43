import sys

from preproc_service.cli import main

sys.exit(main())
