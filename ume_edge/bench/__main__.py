from ume_edge.bench.cli import main

main()
