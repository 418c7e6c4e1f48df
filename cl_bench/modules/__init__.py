"""Building blocks that two or more methods share (heads, PEFT, analytic heads, replay, regularisers, class
statistics and classifier alignment). A part only one method uses lives beside that method in
:mod:`cl_bench.methods`."""
