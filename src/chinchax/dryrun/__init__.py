"""What a run would cost without running it: the dry-run report (`report`: plan, memory, choice) and the AOT
compile of the real train step on a virtual mesh with XLA's memory and cost analysis (`aot`).

May import: every folder below it (config … training).
"""
