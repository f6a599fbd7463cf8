"""One-off measurements behind decisions: each module is run by hand, its results and conclusion are in README.md."""
