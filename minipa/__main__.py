from minipa.cli import main

raise SystemExit(main())
