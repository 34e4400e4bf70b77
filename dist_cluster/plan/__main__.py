"""`python -m dist_cluster.plan --images 96e6 --gpus 64`: the planner (planner.py) from the command line."""
from dist_cluster.plan.cli import main

main()
