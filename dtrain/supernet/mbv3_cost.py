"""Analytical parameters and MACs of an mbv3 subnet.

Counts what the extracted static network holds: every conv / linear weight and
bias and every BN affine pair (running statistics are buffers, not
parameters). MACs are the multiply-accumulates of convolutions and linear
layers for one input at the arch's resolution (BN, activations and pooling
are not counted), e.g. a k x k conv: k*k * (c_in/groups) * c_out * H_out * W_out.
"""

from __future__ import annotations

from .mbv3_layout import MBV3Layout, conv_out


def mbv3_cost(L: MBV3Layout, space, arch: dict) -> dict:
    params = 0
    macs = 0

    def conv(cin, cout, k, size, stride=1, groups=1, bias=False):
        nonlocal params, macs
        out = conv_out(size, k, stride)
        params += k * k * (cin // groups) * cout + (cout if bias else 0)
        macs += k * k * (cin // groups) * cout * out * out
        return out

    def bn(c):
        nonlocal params
        params += 2 * c

    def linear(fin, fout, bias):
        nonlocal params, macs
        params += fin * fout + (fout if bias else 0)
        macs += fin * fout

    size = arch["resolution"]
    size = conv(L.in_channels, L.stem, 3, size, L.stem_stride)
    bn(L.stem)
    conv(L.stem, L.stem, 3, size, groups=L.stem)
    bn(L.stem)
    conv(L.stem, L.stem, 1, size)
    bn(L.stem)
    for s, i, k, e in space.active_blocks(arch):
        cin, cout = L.block_in(s, i), L.stage_widths[s]
        mid = L.mid(cin, e) if L.max_expand > 1 else cin
        if L.max_expand > 1:
            conv(cin, mid, 1, size)
            bn(mid)
        size = conv(mid, mid, k, size, L.block_stride(s, i), groups=mid)
        bn(mid)
        if L.stage_se[s]:
            se = L.se_mid(mid)
            linear(mid, se, True)
            linear(se, mid, True)
        conv(mid, cout, 1, size)
        bn(cout)
    conv(L.stage_widths[-1], L.final, 1, size)
    bn(L.final)
    linear(L.final, L.feature_dim, False)
    linear(L.feature_dim, L.num_classes, True)
    return {"params": int(params), "macs": int(macs)}
