#!/usr/bin/env bash
# Prints "benchmark  throughput" pairs from criterion's text output on stdin.
awk '/^[a-z_]+\/[a-z_]+\/[a-z0-9_+]+/ {name=$1} /thrpt:/ && name != "" {print name, $(NF-3), $(NF-2); name=""}'
