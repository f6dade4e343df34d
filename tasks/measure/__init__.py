"""What a start took and what it costs: startlog (a job log read into phases), results (bench rows,
the plot, the summary), cost (egress, storage and GPU minutes)."""
