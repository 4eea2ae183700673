from dspark_lab.cli import main

raise SystemExit(main())
