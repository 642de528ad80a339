/**
 * `pcache stats --watch`: a compact table of rates and gauges, redrawn every interval from two
 * consecutive `stats` answers of the running server.
 */

const MiB = 2 ** 20;
const n = numberOr0;

/** The part of a `stats` answer the view reads; every field may be missing from an older server. */
export interface StatsSnapshot {
  dirtyBytes?: number;
  nSegs?: number;
  segsUsed?: number;
  writebackError?: string | null;
  writebackLastError?: string | null;
  gcError?: string | null;
  counters?: Partial<Record<'readHits' | 'readMisses' | 'writtenBackBytes' | 'writebackErrors' | 'gcRuns' | 'segmentsFreed' | 'spaceWaits', number>>;
  nbd?: {
    connectionsActive?: number;
    requests?: Partial<Record<'read' | 'write' | 'flush' | 'trim' | 'writeZeroes', number>>;
    bytesRead?: number;
    bytesWritten?: number;
    errors?: number;
  };
  backing?: { state?: string; lastError?: string | null };
}

const OPS = [
  ['read', 'read'],
  ['write', 'write'],
  ['flush', 'flush'],
  ['trim', 'trim'],
  ['writeZeroes', 'write_zeroes'],
] as const;

export function numberOr0(v: number | undefined): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : 0;
}

function perSecond(cur: number, prev: number | undefined, seconds: number): string {
  if (prev === undefined || seconds <= 0) return '-';
  return Math.max(0, (cur - prev) / seconds).toFixed(0);
}

function mibPerSecond(cur: number, prev: number | undefined, seconds: number): string {
  if (prev === undefined || seconds <= 0) return '-';
  return (Math.max(0, cur - prev) / MiB / seconds).toFixed(1);
}

/**
 * One frame. `prev` is the snapshot `seconds` earlier, or null for the first frame (rates are
 * then '-': there is nothing to take a difference from).
 */
export function renderStatsFrame(title: string, cur: StatsSnapshot, prev: StatsSnapshot | null, seconds: number): string {
  const lines: string[] = [title];
  const req = cur.nbd?.requests ?? {};
  const preq = prev?.nbd?.requests;
  lines.push(`${'op'.padEnd(13)}${'IOPS'.padStart(9)}${'MiB/s'.padStart(9)}${'total'.padStart(12)}`);
  for (const [key, name] of OPS) {
    const bytes = key === 'read' ? n(cur.nbd?.bytesRead) : key === 'write' ? n(cur.nbd?.bytesWritten) : null;
    const pbytes = prev === null ? undefined : key === 'read' ? n(prev.nbd?.bytesRead) : key === 'write' ? n(prev.nbd?.bytesWritten) : undefined;
    lines.push(
      `${name.padEnd(13)}${perSecond(n(req[key]), preq ? n(preq[key]) : undefined, seconds).padStart(9)}` +
        `${(bytes === null ? '' : mibPerSecond(bytes, pbytes, seconds)).padStart(9)}${String(n(req[key])).padStart(12)}`,
    );
  }
  const c = cur.counters ?? {};
  const pc = prev?.counters;
  const hits = n(c.readHits);
  const misses = n(c.readMisses);
  const ratio = (h: number, m: number): string => (h + m === 0 ? '-' : `${((100 * h) / (h + m)).toFixed(1)}%`);
  const intervalRatio = pc ? ratio(hits - n(pc.readHits), misses - n(pc.readMisses)) : '-';
  const row = (name: string, value: string): void => void lines.push(`${name.padEnd(13)}${value}`);
  row('hit ratio', `${intervalRatio} now, ${ratio(hits, misses)} since start`);
  row('dirty', `${(n(cur.dirtyBytes) / MiB).toFixed(1)} MiB`);
  const wbError = cur.writebackLastError ?? cur.writebackError;
  row(
    'write-back',
    `${mibPerSecond(n(c.writtenBackBytes), pc ? n(pc.writtenBackBytes) : undefined, seconds)} MiB/s, ${(n(c.writtenBackBytes) / MiB).toFixed(1)} MiB in all, ` +
      `${n(c.writebackErrors)} errors${wbError ? ` (last: ${wbError})` : ''}`,
  );
  const segs = n(cur.nSegs);
  const used = n(cur.segsUsed);
  row('segments', `${used} used of ${segs} (${segs ? Math.round((100 * used) / segs) : 0}%), ${segs - used} free`);
  row('gc', `${n(c.gcRuns)} runs, ${n(c.segmentsFreed)} segments freed${cur.gcError ? ` (error: ${cur.gcError})` : ''}`);
  row('space waits', `${n(c.spaceWaits)}`);
  row('clients', `${n(cur.nbd?.connectionsActive)}, ${n(cur.nbd?.errors)} error replies`);
  if (cur.backing) row('backing', `${cur.backing.state ?? '?'}${cur.backing.lastError ? ` (last error: ${cur.backing.lastError})` : ''}`);
  return lines.join('\n') + '\n';
}

/** Clears a terminal and moves home, so each frame replaces the last. */
export const CLEAR_SCREEN = '\x1b[H\x1b[2J';
