import sys

from compiler.inspect.cli import main

if __name__ == "__main__":
    sys.exit(main())
