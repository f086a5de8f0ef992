#!/bin/sh
# The glpk appliance's apppot-autorun: solves each GNU MathProg model (*.mod)
# in the job directory with glpsol, writing MODEL.sol next to it. Its exit
# status is 0 if every model was solved, else the last failing glpsol's.
status=0
found=0
for model in *.mod; do
    [ -f "$model" ] || continue
    found=1
    echo "== $model"
    glpsol --math "$model" --output "${model%.mod}.sol" || status=$?
done
if [ "$found" = 0 ]; then
    echo "glpk appliance: no *.mod model in the job directory; put one there or run glpsol-apppot" >&2
    exit 2
fi
exit "$status"
