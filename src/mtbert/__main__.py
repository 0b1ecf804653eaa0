from mtbert.cli import main

raise SystemExit(main())
