"""`dpa demo`: the whole pipeline on synthetic pictures of shapes, on a laptop CPU, in minutes."""
