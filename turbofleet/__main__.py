from turbofleet.cli import main

raise SystemExit(main())
