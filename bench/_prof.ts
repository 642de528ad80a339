let t = Date.now();
const lap = (s: string) => { const n = Date.now(); console.log(s, n - t); t = n; };
const a = Buffer.alloc(2*1024*1024*1024);
const b = Buffer.alloc(2*1024*1024*1024);
lap('alloc');
const chunk = Buffer.allocUnsafe(64*1024*1024);
for (let off = 0; off < 2*1024*1024*1024; off += chunk.length) { a.copy(chunk, 0, off, off+chunk.length); }
lap('copy');
for (let off = 0; off < 2*1024*1024*1024; off += chunk.length) { if (!chunk.equals(b.subarray(off, off+chunk.length))) throw 1; }
lap('equals');
a.fill(1, 0, 1024*1024*1024);
lap('fill 1G');
console.log(process.memoryUsage().rss/1e6);
