from latentpatch.cli import main

raise SystemExit(main())
