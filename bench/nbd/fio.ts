/** fio with its nbd engine: the command line for a case, and the figures from its JSON output. */
import { promises as fsp } from 'node:fs';
import { commandLine } from './servers.js';
import { run } from './sys.js';

export interface FioJob {
  name: string;
  rw: 'randwrite' | 'randread' | 'write' | 'read';
  bs: number;
  iodepth: number;
  numjobs: number;
  /** Region: jobs > 1 each take their own slice of it, one after another. */
  offset: number;
  size: number;
  /** Seconds, time based; or null to do the region once (a burst or a priming pass). */
  runtime: number | null;
  /** Durability work, the same on every server it is compared across: a FLUSH at the end, or every N writes. */
  endFsync?: boolean;
  fsyncEvery?: number;
  /** With runtime null: stop after this many seconds if the region is not done by then. */
  capSeconds?: number;
  /** Further fio options, after the others (e.g. an IOPS log). */
  extra?: string[];
}

export interface FioFigures {
  ios: number;
  iops: number;
  mibps: number;
  /** Total latency (submission to completion), nanoseconds. */
  meanLatNs: number;
  p99LatNs: number;
  /** fio's own measured run time, seconds. */
  seconds: number;
}

export function fioArgs(job: FioJob, uri: string, output: string): string[] {
  const slice = job.numjobs > 1 ? Math.floor(job.size / job.numjobs / job.bs) * job.bs : job.size;
  return [
    `--name=${job.name}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--numjobs=${job.numjobs}`,
    '--group_reporting',
    `--offset=${job.offset}`,
    `--size=${slice}`,
    ...(job.numjobs > 1 ? [`--offset_increment=${slice}`] : []),
    ...(job.runtime !== null ? ['--time_based', `--runtime=${job.runtime}`] : job.capSeconds !== undefined ? [`--runtime=${job.capSeconds}`] : []),
    ...(job.endFsync ? ['--end_fsync=1'] : []),
    ...(job.fsyncEvery ? [`--fsync=${job.fsyncEvery}`] : []),
    '--lat_percentiles=1',
    '--output-format=json',
    `--output=${output}`,
    ...(job.extra ?? []),
  ];
}

export function fioCommand(job: FioJob, uri: string, output: string): string {
  return commandLine('fio', fioArgs(job, uri, output));
}

interface FioDir {
  total_ios?: number;
  iops?: number;
  bw_bytes?: number;
  runtime?: number;
  lat_ns?: { mean?: number; percentile?: Record<string, number> };
  clat_ns?: { mean?: number; percentile?: Record<string, number> };
}

export async function runFio(job: FioJob, uri: string, output: string): Promise<FioFigures> {
  await fsp.rm(output, { force: true });
  const r = await run('fio', fioArgs(job, uri, output));
  const text = await fsp.readFile(output, 'utf8').catch(() => '');
  if (r.code !== 0) throw new Error(`fio exited ${r.code ?? r.signal}: ${(r.stderr || r.stdout).trim().split('\n').slice(-4).join(' | ')}`);
  // fio's log lines can precede the JSON in its output file.
  const start = text.indexOf('{');
  if (start < 0) throw new Error(`fio wrote no JSON: ${r.stderr.trim()}`);
  const doc = JSON.parse(text.slice(start)) as { jobs?: Array<Record<string, unknown>> };
  const j = doc.jobs?.[0];
  if (!j) throw new Error('fio JSON has no job');
  if (j.error) throw new Error(`fio job error ${String(j.error)}`);
  const d = (job.rw === 'randread' || job.rw === 'read' ? j.read : j.write) as FioDir;
  const lat = d.lat_ns?.percentile ? d.lat_ns : d.clat_ns;
  const seconds = (d.runtime ?? 0) / 1000;
  return {
    ios: d.total_ios ?? 0,
    iops: d.iops ?? 0,
    mibps: (d.bw_bytes ?? 0) / 2 ** 20,
    meanLatNs: d.lat_ns?.mean ?? d.clat_ns?.mean ?? 0,
    p99LatNs: lat?.percentile?.['99.000000'] ?? 0,
    seconds,
  };
}
