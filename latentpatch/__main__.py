from latentpatch.cli.entry import main

raise SystemExit(main())
