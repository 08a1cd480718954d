from enosfs.cli import main

raise SystemExit(main())
