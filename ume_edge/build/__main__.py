from ume_edge.build.cli import main

main()
