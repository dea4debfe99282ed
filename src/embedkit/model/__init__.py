"""What an artifact is and how one is made: recipes, Optimum export, manifest + checksums,
signatures, toolchain versions, and the evaluation data the checks share."""
