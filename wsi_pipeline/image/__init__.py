"""From slide file to cells: reading, the countable smear area, tiles, stain, detection, crops."""
