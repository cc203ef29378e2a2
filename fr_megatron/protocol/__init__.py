"""The control protocol: where things live in the job's store and how messages are signed."""
