from han_edge.cli import main

main()
