"""The vocabulary of formats, torch-free: what a name means and how many bytes it takes, asked by the
engine, the trainer and the planner alike (`slimlm plan` computes with these same functions).

- `sizes`: byte sizes in (`parse_size`) and out (`format_bytes`)
"""
