# gnuplot script of `bench/run guest`: latency distributions of the guest's
# O_DIRECT writes, one curve per mode.  Called as
#   gnuplot -e "dir='RESULTS/guest'; out='PNG'; title='...'; modes='none lib ...'" plot.gp
set terminal pngcairo size 1600,1000 font ",10" noenhanced
set output out
set multiplot layout 2,2 title title

set grid
set logscale x
set format x "%g"
set xlabel "latency (ms, log scale)"

do for [s in "64k 4k"] {
  set title s . " writes: distribution (CDF)"
  unset logscale y
  set ylabel "fraction of writes ≤ x"
  set yrange [0:1.02]
  set key bottom right
  plot for [m in modes] dir . "/guest-lat-" . m . "-" . s . ".dat" using 1:2 with steps lw 2 title m
}
do for [s in "64k 4k"] {
  set title s . " writes: tail (fraction slower than x)"
  set logscale y
  set ylabel "fraction of writes > x (log scale)"
  set yrange [1e-3:1.2]
  set key top right
  plot for [m in modes] dir . "/guest-lat-" . m . "-" . s . ".dat" using 1:(1.0001 - $2) with steps lw 2 title m
}
unset multiplot
