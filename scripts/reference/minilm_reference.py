# Independent numpy forward of all-MiniLM-L6-v2 (float64) that produced the reference values in
# tests/encoders.rs. Needs: pip install numpy tokenizers; scripts/fetch-assets.sh minilm.
import json, struct, numpy as np
from math import erf
from tokenizers import Tokenizer
import os
d=os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../.cache/assets/all-MiniLM-L6-v2/')
f=open(d+'model.safetensors','rb'); n=struct.unpack('<Q',f.read(8))[0]; h=json.loads(f.read(n)); data=f.read()
W={}
for k,v in h.items():
    if k=='__metadata__' or v['dtype']!='F32': continue
    a,b=v['data_offsets']; W[k]=np.frombuffer(data[a:b],dtype=np.float32).reshape(v['shape']).astype(np.float64)
tok=Tokenizer.from_file(d+'tokenizer.json'); tok.no_padding()
def ln(x,w,b,eps=1e-12):
    m=x.mean(-1,keepdims=True); v=((x-m)**2).mean(-1,keepdims=True); return (x-m)/np.sqrt(v+eps)*w+b
verf=np.vectorize(erf)
def gelu(x): return 0.5*x*(1+verf(x/np.sqrt(2)))
def embed(s):
    ids=tok.encode(s).ids; T=len(ids)
    x=W['embeddings.word_embeddings.weight'][ids]+W['embeddings.position_embeddings.weight'][:T]+W['embeddings.token_type_embeddings.weight'][0]
    x=ln(x,W['embeddings.LayerNorm.weight'],W['embeddings.LayerNorm.bias'])
    H=12; dh=384//H
    for l in range(6):
        p=f'encoder.layer.{l}.'
        lin=lambda x,n: x@W[p+n+'.weight'].T+W[p+n+'.bias']
        q=lin(x,'attention.self.query').reshape(T,H,dh).transpose(1,0,2)
        k=lin(x,'attention.self.key').reshape(T,H,dh).transpose(1,0,2)
        v=lin(x,'attention.self.value').reshape(T,H,dh).transpose(1,0,2)
        a=q@k.transpose(0,2,1)/np.sqrt(dh); a=np.exp(a-a.max(-1,keepdims=True)); a/=a.sum(-1,keepdims=True)
        c=(a@v).transpose(1,0,2).reshape(T,384)
        x=ln(lin(c,'attention.output.dense')+x,W[p+'attention.output.LayerNorm.weight'],W[p+'attention.output.LayerNorm.bias'])
        i=gelu(lin(x,'intermediate.dense'))
        x=ln(lin(i,'output.dense')+x,W[p+'output.LayerNorm.weight'],W[p+'output.LayerNorm.bias'])
    m=x.mean(0); return ids, m/np.linalg.norm(m)
S=["Title: Classic red lamp. Brand: Kalo.","A bright desk light","Quarterly stock market report"]
E=[embed(s) for s in S]
for s,(ids,e) in zip(S,E): print(s, len(ids), [round(float(v),6) for v in e[:4]])
print("cos lamp-light", float(E[0][1]@E[1][1]), "lamp-stock", float(E[0][1]@E[2][1]))
