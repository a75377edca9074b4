import sys

from compiler.inspect.cli import main

sys.exit(main())
