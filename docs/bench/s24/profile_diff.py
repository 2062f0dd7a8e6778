"""Differential py-spy profile: inclusive microseconds per request of each function, revision A minus B.

usage: python profile_diff.py A.raw A_REQ_PER_S B.raw B_REQ_PER_S  (py-spy record -f raw, one busy core)
"""
import sys, collections, re
def load(p):
    inc=collections.Counter(); tot=0
    for line in open(p):
        stack,_,n=line.rstrip().rpartition(' ')
        n=int(n); tot+=n
        seen=set()
        for f in stack.split(';'):
            name=re.sub(r' \(.*?/(site-packages|sw-[0-9a-f]+)/', ' (', f)
            name=re.sub(r':\d+\)$',')',name)
            if name not in seen: seen.add(name); inc[name]+=n
    return inc,tot
m,tm=load(sys.argv[1]); b,tb=load(sys.argv[3])
rm,rb=float(sys.argv[2]),float(sys.argv[4])  # req/s while profiled
# us per request = share * 1e6 / reqps (one core busy)
rows=[]
for k in set(m)|set(b):
    um=m[k]/tm*1e6/rm; ub=b[k]/tb*1e6/rb
    rows.append((um-ub,um,ub,k))
rows.sort(reverse=True)
print("total us/req main %.0f base %.0f"%(1e6/rm,1e6/rb))
for d,um,ub,k in rows[:45]: print("%+7.1f %7.1f %7.1f  %s"%(d,um,ub,k[:150]))
