# gnuplot script of bench/run: the latency distributions of the latency
# section.  Called as
#   gnuplot -e "dir='RESULTS'; out='PNG'; qemu='10.0.2'; modes='floor nofleece lib ...'" plot.gp
set terminal pngcairo size 1800,600 font ",10"
set output out
set multiplot layout 1,3 title "Guest write latency: 64 KiB writes through the device, ahead of a backup to a 4 MiB/s NBD target (QEMU " . qemu . ", TCG, HMP qemu-io)"

set grid
set logscale x
set xlabel "latency (ms, log scale)"
set key bottom right

set title "Distribution (CDF)"
set ylabel "fraction of writes ≤ x"
set yrange [0:1.02]
plot for [m in modes] dir . "/lat-" . m . ".dat" using 1:2 with steps lw 2 title m

set title "Tail (fraction of writes slower than x)"
set logscale y
set ylabel "fraction of writes > x (log scale)"
set yrange [1e-4:1.2]
set key top right
plot for [m in modes] dir . "/lat-" . m . ".dat" using 1:(1.0001 - $2) with steps lw 2 title m

unset logscale x
set title "Fleecing variants: p50 and p99 (dashed: the floor's)"
set ylabel "latency (ms, log scale)"
set xlabel ""
set yrange [0.5:*]
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.7 border -1
set boxwidth 0.9
set xtics rotate by -30
set key top left
fp50 = real(system("awk 'NR==2 {print $4}' " . dir . "/variants.dat"))
fp99 = real(system("awk 'NR==2 {print $5}' " . dir . "/variants.dat"))
plot dir . "/variants.dat" using 2:xtic(1) title "p50", \
     "" using 3 title "p99", \
     fp50 with lines dt 2 lc rgb "black" title "floor p50", \
     fp99 with lines dt 2 lc rgb "red" title "floor p99"
unset multiplot
