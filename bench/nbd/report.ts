/** BENCHMARKS.md from the results of a run. */
import { relative } from 'node:path';
import { EXPORT_SIZE, REGION, type CaseResult, type Results, type Section } from './cases.js';
import { GiB, MiB } from './sys.js';

function num(n: number, digits = 0): string {
  return n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function usec(ns: number): string {
  const us = ns / 1000;
  return us >= 100 ? num(us) : num(us, 1);
}

function ratio(a: number | null | undefined, b: number | null | undefined): string {
  if (a === null || a === undefined || b === null || b === undefined || b === 0) return '–';
  const r = a / b;
  return `${r >= 10 ? num(r, 1) : num(r, 2)}x`;
}

function find(r: Results, section: Section, server: string, caseId: string): CaseResult | undefined {
  return r.cases.find((c) => c.section === section && c.server === server && c.caseId === caseId);
}

const LABELS: Record<string, string> = {
  memory: 'nbdkit memory',
  file: 'nbdkit file',
  pcache: 'pcache',
  slow: 'nbdkit delay (slow backing, direct)',
  'nbdkit-cache': 'nbdkit cache filter (writeback) -> delay',
  'nbdkit-cache-4k': 'nbdkit cache filter (writeback, 4K blocks) -> delay',
  'pcache-slow': 'pcache -> slow backing',
};

const SHORT: Record<string, string> = {
  memory: 'nbdkit memory',
  file: 'nbdkit file',
  pcache: 'pcache',
  slow: 'direct',
  'nbdkit-cache': 'cache filter',
  'nbdkit-cache-4k': 'cache filter 4K',
  'pcache-slow': 'pcache',
};

function serverLabel(r: Results, section: Section, id: string): string {
  return r.servers.find((s) => s.section === section && s.id === id)?.label ?? LABELS[id] ?? id;
}

function caseIds(r: Results, section: Section): Array<{ id: string; label: string }> {
  const seen = new Map<string, string>();
  for (const c of r.cases) if (c.section === section && !seen.has(c.caseId)) seen.set(c.caseId, c.label);
  return [...seen].map(([id, label]) => ({ id, label }));
}

function cell(c: CaseResult | undefined, f: (c: CaseResult & { fio: NonNullable<CaseResult['fio']> }) => string): string {
  if (!c) return 'not run';
  if (c.error || !c.fio) return 'error';
  return f(c as CaseResult & { fio: NonNullable<CaseResult['fio']> });
}

/** Summary: IOPS of every server and pcache's ratio to each reference. */
function summaryTable(r: Results, section: Section, subject: string, refs: string[]): string[] {
  const short = (id: string): string => SHORT[id] ?? id;
  const head = ['case', `${short(subject)} IOPS`, ...refs.map((id) => `${short(id)} IOPS`), ...refs.map((id) => `pcache ÷ ${short(id)}`), 'pcache read hits'];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((_, i) => (i === 0 ? '---' : '---:')).join('|')}|`];
  for (const { id, label } of caseIds(r, section)) {
    const s = find(r, section, subject, id);
    const row = [
      label,
      cell(s, (c) => num(c.fio.iops)),
      ...refs.map((ref) => cell(find(r, section, ref, id), (c) => num(c.fio.iops))),
      ...refs.map((ref) => ratio(s?.fio?.iops, find(r, section, ref, id)?.fio?.iops)),
      s?.hitPct !== null && s?.hitPct !== undefined ? `${num(s.hitPct, 1)}%` : '',
    ];
    lines.push(`| ${row.join(' | ')} |`);
  }
  return lines;
}

/** Details: every figure of every server, then pcache's ratio to each reference, figure by figure. */
function detailTable(r: Results, section: Section, subject: string, refs: string[]): string[] {
  const head = ['case', 'server', 'IOPS', 'MiB/s', 'mean lat µs', 'p99 lat µs', 'server CPU s / 100k req', 'others\' CPU (cores)'];
  const lines = [`| ${head.join(' | ')} |`, `|---|---|${head.slice(2).map(() => '---:').join('|')}|`];
  for (const { id, label } of caseIds(r, section)) {
    let first = true;
    const caseCell = (): string => {
      const t = first ? label : '';
      first = false;
      return t;
    };
    for (const sid of [...refs, subject]) {
      const c = find(r, section, sid, id);
      const name = sid === subject ? `**${serverLabel(r, section, sid)}**` : serverLabel(r, section, sid);
      if (!c) continue;
      if (c.error || !c.fio) {
        lines.push(`| ${caseCell()} | ${name} | error: ${c.error?.replace(/\|/g, '/').split('\n')[0] ?? 'no figures'} | | | | | |`);
        continue;
      }
      lines.push(
        `| ${caseCell()} | ${name} | ${num(c.fio.iops)} | ${num(c.fio.mibps, 1)} | ${usec(c.fio.meanLatNs)} | ${usec(c.fio.p99LatNs)} | ` +
          `${c.cpuPer100k !== null ? num(c.cpuPer100k, 2) : '–'} | ${c.otherCores !== null ? num(c.otherCores, 2) : '–'} |`,
      );
    }
    const s = find(r, section, subject, id);
    if (!s?.fio) continue;
    for (const ref of refs) {
      const c = find(r, section, ref, id);
      if (!c?.fio) continue;
      lines.push(
        `| | _pcache ÷ ${serverLabel(r, section, ref)}_ | ${ratio(s.fio.iops, c.fio.iops)} | ${ratio(s.fio.mibps, c.fio.mibps)} | ${ratio(s.fio.meanLatNs, c.fio.meanLatNs)} | ` +
          `${ratio(s.fio.p99LatNs, c.fio.p99LatNs)} | ${ratio(s.cpuPer100k, c.cpuPer100k)} | |`,
      );
    }
  }
  return lines;
}

/** How much of the primed region pcache still held when it was first read back after the flush. */
function primedNote(r: Results, section: Section): string[] {
  const s = r.servers.find((x) => x.section === section && x.primedHitPct !== undefined && x.primedHitPct !== null);
  if (!s || s.primedHitPct === null || s.primedHitPct === undefined) return [];
  const pct = s.primedHitPct;
  const tail =
    pct < 99
      ? ' The rest had been evicted by then, although it was the most recently written data; ' +
        'the untimed read pass brought it back, so the cached-read cases measure hits.'
      : '';
  return [`When the ${num(REGION.cached.size / MiB)} MiB cached region was first read back after being written and flushed, ${s.label} held ${num(pct, 1)}% of it.${tail}`, ''];
}

type Verdict = 'met' | 'NOT met' | 'not measured';

function verdict(value: number | null | undefined, ref: number | null | undefined, target: number): { v: Verdict; r: string } {
  if (value === null || value === undefined || ref === null || ref === undefined || ref === 0) return { v: 'not measured', r: '–' };
  return { v: value / ref >= target ? 'met' : 'NOT met', r: ratio(value, ref) };
}

/** The issue's targets, one markdown bullet each (also printed at the end of a run). */
export function targetLines(r: Results): string[] {
  const lines: string[] = [];
  const iops = (section: Section, server: string, id: string): number | undefined => find(r, section, server, id)?.fio?.iops;
  const fast = (what: string, id: string, alt: string): void => {
    const p = iops('main', 'pcache', id);
    const m = iops('main', 'memory', id);
    const { v, r: rr } = verdict(p, m, 0.9);
    const pa = iops('main', 'pcache', alt);
    const ma = iops('main', 'memory', alt);
    const extra = pa !== undefined && ma !== undefined ? `; with 4 jobs of qd32: ${ratio(pa, ma)}` : '';
    lines.push(`- **${what}, iodepth 32, ≥ 0.9x nbdkit memory: ${v}** — pcache ${p !== undefined ? num(p) : '–'} IOPS vs ${m !== undefined ? num(m) : '–'} = ${rr}${extra}.`);
  };
  fast('4 KiB random write', 'randwrite-4k-qd32-j1', 'randwrite-4k-qd32-j4');
  fast('4 KiB random read of cached data', 'cachedread-4k-qd32-j1', 'cachedread-4k-qd32-j4');

  const slowIds = caseIds(r, 'slow').filter((c) => c.id.startsWith('randwrite-'));
  if (slowIds.length === 0) lines.push('- **Slow backing, 4 KiB random write, ≥ 10x direct and ≥ 1.0x nbdkit cache filter: not measured**.');
  for (const { id, label } of slowIds) {
    const p = iops('slow', 'pcache-slow', id);
    const d = verdict(p, iops('slow', 'slow', id), 10);
    const c = verdict(p, iops('slow', 'nbdkit-cache', id), 1.0);
    const c4 = verdict(p, iops('slow', 'nbdkit-cache-4k', id), 1.0);
    const all = [d.v, c.v, c4.v];
    const overall: Verdict | 'met where measured' = all.includes('NOT met')
      ? 'NOT met'
      : all.every((v) => v === 'not measured')
        ? 'not measured'
        : all.includes('not measured')
          ? 'met where measured'
          : 'met';
    lines.push(
      `- **Slow backing, ${label}: ≥ 10x direct and ≥ 1.0x nbdkit cache filter: ${overall}** — pcache ${p !== undefined ? num(p) : '–'} IOPS = ${d.r} the slow backing direct (${d.v}); ` +
        `${c.r} nbdkit's cache filter with its default 64K blocks (${c.v}); ${c4.r} the cache filter with cache-min-block-size=4K (${c4.v}).`,
    );
  }
  if (slowIds.length > 0) {
    lines.push(`  ${r.slowBackingNote} pcache keeps its cache across a restart (it is the dm-pcache on-disk format); nbdkit's cache filter deletes its cache on exit. This run does not measure a restart.`);
  }
  const dr = r.drain;
  if (!dr || dr.error) {
    lines.push(`- **Write-back drain ≥ 0.8x nbdcopy: not measured**${dr?.error ? ` (${dr.error.split('\n')[0]})` : ''}.`);
  } else {
    const { v, r: rr } = verdict(dr.pcacheMiBps, dr.nbdcopyMiBps, 0.8);
    lines.push(
      `- **Write-back drain ≥ 0.8x nbdcopy: ${v}** — pcache's flush wrote back ${num((dr.flushedBytes ?? 0) / MiB, 0)} MiB at ${num(dr.pcacheMiBps ?? 0, 1)} MiB/s, ` +
        `nbdcopy wrote ${num(dr.burstBytes / MiB)} MiB at ${num(dr.nbdcopyMiBps ?? 0, 1)} MiB/s = ${rr}.` +
        ((dr.flushedBytes ?? 0) < dr.burstBytes / 4
          ? ' The background write-back drained most of the burst before the flush began, so the flush figure rests on little data; the end-to-end rate in the drain table is a lower bound.'
          : ''),
    );
  }
  return lines;
}

function shellBlock(lines: string[]): string[] {
  return ['```sh', ...lines, '```'];
}

export function renderMarkdown(r: Results, where: { repo: string; mdPath: string }): string {
  const m = r.machine;
  const hide = (t: string): string => t.split(r.dir).join('$DIR').split(where.repo).join('');
  const hideUri = (t: string): string => hide(t).replace(/["']?--uri=nbd\+unix:\/\/\/\?socket=[^\s'"]+["']?/, '--uri="$URI"');
  const args = r.argv.length ? ` ${r.argv.join(' ')}` : '';
  const jsonNote = relative(where.repo, where.mdPath) === 'BENCHMARKS.md' ? 'bench/nbd/results.json' : 'the results.json written next to it';
  const out: string[] = [];
  out.push('# pcache NBD benchmarks', '');
  out.push(
    `Written by \`node --import tsx bench/nbd/run.ts${args}\` (\`npm run bench${args ? ` --${args}` : ''}\`), ${r.startedAt.replace('T', ' ').slice(0, 16)} to ${r.finishedAt.slice(11, 16)} UTC; ` +
      `the raw figures are in ${jsonNote}. Rerun with \`npm run bench\` (the full run, about 13 minutes, overwrites this file) ` +
      'or `npm run bench -- --quick` (a harness check, written to bench/nbd/out/).',
    '',
  );
  out.push('## Machine', '');
  out.push(`- ${m.cpus} cores (${m.cpuModel}), ${m.memGiB} GiB RAM, kernel ${m.kernel}`);
  out.push(`- Node ${m.node}, ${m.fio}, ${m.nbdkit}, ${m.nbdcopy}`);
  out.push(`- files on ${m.filesystem} (a temporary directory, removed after the run)`);
  out.push(`- load average ${m.loadAtStart} at the start, ${m.loadAtEnd} at the end (other work on the machine shows in the "others' CPU" column)`);
  out.push(`- pcache at commit ${m.gitCommit}${m.gitDirty ? ' with uncommitted changes' : ''}`);
  out.push(
    `- ${r.plan.runtime} s per case${r.plan.quick ? ' (--quick: a subset of the cases)' : ''}; pcache's cache device a ${num(r.cacheSize / GiB, 2)} GiB sparse file; ` +
      `every export ${EXPORT_SIZE / GiB} GiB`,
    '',
  );

  const others = r.cases.map((c) => c.otherCores).filter((x): x is number => x !== null);
  const meanOthers = others.length ? others.reduce((a, b) => a + b, 0) / others.length : 0;
  if (meanOthers > 0.25) {
    out.push(
      `> **Noisy machine:** other processes used ${num(meanOthers, 2)} of the ${m.cpus} cores on average while the cases ran (the "others' CPU" column), ` +
        'so every figure here is lower and noisier than on a quiet machine, the references as much as pcache. Ratios from one run still compare like with like, roughly.',
      '',
    );
  }
  out.push('## Commands', '');
  out.push('The servers, one at a time, each on its own unix socket (`$DIR` is the temporary directory):', '');
  const cmds: string[] = [];
  for (const s of r.servers) for (const c of s.commands) if (!cmds.includes(hide(c))) cmds.push(hide(c));
  out.push(...shellBlock(cmds), '');
  out.push("fio against each server (`$URI` is the server's `nbd+unix:///?socket=...`):", '');
  const fios: string[] = [];
  for (const c of r.cases) {
    const line = hideUri(c.command).replace(/--output=\S+/, '--output=OUT.json');
    if (c.command && !fios.includes(line)) fios.push(line);
  }
  out.push(...shellBlock(fios), '');
  if (r.drain) {
    out.push('Write-back drain:', '');
    out.push(...shellBlock(r.drain.commands.map((c) => hideUri(c).replace(/--output=\S+/, '--output=OUT.json'))), '');
  }

  out.push('## Method', '');
  out.push(
    `- Every server listens on a unix socket and fio's nbd engine drives it (one NBD connection per fio job; \`--group_reporting\` sums the jobs). ` +
      'Latency is fio\'s total latency (`lat_ns`: submission to completion), mean and 99th percentile.',
    '- Server CPU is user + system time of the server process (all its threads) from /proc/<pid>/stat, read before and after each case, per 100,000 requests. ' +
      'For pcache in front of an nbdkit backing, both processes count. fio\'s own CPU is not counted; fio and the server share the same cores.',
    `- Regions of the export: 4K random writes in the first ${REGION.randwrite.size / MiB} MiB, sequential writes in the first ${REGION.seqwrite.size / GiB} GiB; ` +
      `cached reads in ${REGION.cached.size / MiB} MiB at ${REGION.cached.offset / GiB} GiB, written (1 MiB writes) just before the cached-read cases; ` +
      `each uncached-read case reads its own 1 GiB region from 2 GiB up, which holds data in the backing file and was never read or written through the server. ` +
      'With several jobs, each job has its own slice of the region (`--offset_increment`).',
    '- Every write case, on every server, ends with a FLUSH inside the timed run (fio `--end_fsync=1`): pcache and the servers that store data (nbdkit file, ' +
      'nbdkit over the delay filter) do the same durability work; nbdkit memory, whose flush costs nothing, stays the ceiling for the cost of a request. ' +
      "The nbdkit cache filter rows are the exception: their cache is a temporary file, so their FLUSH writes every cached block back through the delay, one at a time (minutes); they run without it. " +
      "The durable-write cases of the `--case` section below set pcache against nbdkit file with the same flushes and report the cache file's own filesystem as the physical limit.",
    '- In the first table one server start takes all the cases. After every write case, untimed: `pcache flush` (so each case starts with nothing dirty), and fdatasync of the files under the server. ' +
      "Before every uncached-read case the backing file is dropped from the page cache (posix_fadvise DONTNEED via `dd oflag=nocache`), for nbdkit file and pcache alike; " +
      "pcache's own cache device file stays in the page cache. nbdkit memory reads unwritten regions as zeroes, with no storage behind them.",
    '- The cached region is written, flushed (`pcache flush`), then read once sequentially with 1 MiB reads, untimed, on every server, before the cached-read cases: ' +
      'whatever a cache let go after the write-back is read back in, so those cases measure hits (the "pcache read hits" column checks it). ' +
      "How much of the region pcache still held at that first read is reported under the tables.",
    "- Ratios are pcache ÷ reference from the same run: above 1 is better for IOPS and MiB/s, below 1 is better for latency and CPU.",
    '- The slow backing is nbdkit file over the same backing file behind `--filter=delay delay-write=2ms delay-read=2ms`; nbdkit\'s cache filter in `cache=writeback` mode sits on top of the same delay ' +
      '(its cache file in the temporary directory), once with its default 64 KiB blocks (a 4 KiB write to an uncached block first reads the whole block through the delay) ' +
      'and once with `cache-min-block-size=4K` (whole-block writes, no read).',
    '- Each slow-backing case runs on a freshly started server (pcache on a fresh cache device), so every cache starts empty and nothing is flushed in between ' +
      '(through the slow backing a flush takes longer than the case).',
    '- Before its write cases nbdkit memory gets its write region written once (it allocates memory on first write), and the backing file holds data in the write region, ' +
      'so every server overwrites allocated storage.',
    `- Write-back drain: a fresh pcache takes ${num(r.plan.drainBytes / MiB)} MiB of 64 KiB random writes (qd32, every block once), then \`pcache flush\` is timed ` +
      '(the control request itself, without CLI start-up); the rate is the bytes written back during the flush (from pcache\'s `writtenBackBytes` counter) over its time. ' +
      'pcache writes back in the background during the burst too, so the flush drains what was still dirty. nbdcopy (`--flush`) copies a file of the same size to an nbdkit file export of the same backing file.',
    '',
  );

  const mainServers = r.servers.filter((s) => s.section === 'main');
  if (mainServers.length) {
    out.push('## pcache against nbdkit memory (the ceiling) and nbdkit file (no cache)', '');
    for (const s of mainServers) if (s.error) out.push(`${s.label}: ${s.error}`, '');
    out.push('### IOPS', '');
    out.push(...summaryTable(r, 'main', 'pcache', ['memory', 'file']), '');
    out.push(...primedNote(r, 'main'));
    out.push('### All figures', '');
    out.push(...detailTable(r, 'main', 'pcache', ['memory', 'file']), '');
  }
  const slowServers = r.servers.filter((s) => s.section === 'slow');
  if (slowServers.length) {
    out.push('## Slow backing: 2 ms per read and per write', '');
    out.push(r.slowBackingNote, '');
    out.push(
      '"direct" is the slow backing used directly; "cache filter" is nbdkit\'s cache filter (`cache=writeback`, default 64 KiB blocks) over it; ' +
        '"cache filter 4K" the same with `cache-min-block-size=4K`.',
      '',
    );
    for (const s of slowServers) if (s.error) out.push(`${s.label}: ${s.error}`, '');
    out.push('### IOPS', '');
    out.push(...summaryTable(r, 'slow', 'pcache-slow', ['slow', 'nbdkit-cache', 'nbdkit-cache-4k']), '');
    out.push(...primedNote(r, 'slow'));
    out.push('### All figures', '');
    out.push(...detailTable(r, 'slow', 'pcache-slow', ['slow', 'nbdkit-cache', 'nbdkit-cache-4k']), '');
  }
  if (r.drain) {
    const d = r.drain;
    out.push('## Write-back drain', '');
    if (d.error) out.push(`Error: ${d.error}`, '');
    out.push(`pcache's backing device: ${d.backing || '–'}.`, '');
    out.push('| | MiB | seconds | MiB/s | server CPU s |', '|---|---:|---:|---:|---:|');
    const f = (n: number | null, digits: number): string => (n === null ? '–' : num(n, digits));
    out.push(`| burst into pcache (64 KiB random writes, qd32) | ${num(d.burstBytes / MiB)} | ${f(d.burstSeconds, 2)} | ${f(d.burstMiBps, 1)} | |`);
    out.push(`| dirty when the flush began | ${d.dirtyAtFlush === null ? '–' : num(d.dirtyAtFlush / MiB, 1)} | | | |`);
    out.push(`| **pcache flush** (written back during it) | ${d.flushedBytes === null ? '–' : num(d.flushedBytes / MiB, 1)} | ${f(d.flushSeconds, 2)} | ${f(d.pcacheMiBps, 1)} | ${f(d.pcacheCpuSeconds, 2)} |`);
    const e2e = d.burstSeconds !== null && d.flushSeconds !== null ? d.burstSeconds + d.flushSeconds : null;
    out.push(`| pcache burst + flush, end to end (a lower bound on the drain rate) | ${num(d.burstBytes / MiB)} | ${f(e2e, 2)} | ${e2e ? f(d.burstBytes / MiB / e2e, 1) : '–'} | |`);
    out.push(`| nbdcopy --flush to nbdkit file | ${num(d.burstBytes / MiB)} | ${f(d.nbdcopySeconds, 2)} | ${f(d.nbdcopyMiBps, 1)} | ${f(d.nbdcopyCpuSeconds, 2)} |`);
    out.push(`| _pcache ÷ nbdcopy_ | | | ${ratio(d.pcacheMiBps, d.nbdcopyMiBps)} | |`, '');
  }
  out.push('## Targets', '');
  out.push(...targetLines(r), '');
  return out.join('\n');
}
