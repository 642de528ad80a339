import { dumpCache, type CacheDump, type KeyView, type SegmentView, type TwoSlotView } from '../cache/dump.js';
import { formatPosition, hex32, samePosition, type Position } from '../format/index.js';
import { parseArgs } from './args.js';
import type { CliIo, Command } from './command.js';
import { withCacheDevice } from './device.js';
import { EXIT_FAILURE, EXIT_OK } from './errors.js';

const help = `usage: pcache dump <cache-dev> [--json]

Print everything on a cache device: the superblock, both slots of cache_info and of the tails,
the segment chain with each segment's generation, and the log from key_tail to its end, kset by
kset with every key. A damaged record is shown as found; the dump goes as far as it can and
exits 1 when damage stopped it early.

  --json    print the dump as JSON, for tools
`;

const spec = { json: { type: 'boolean' } } as const;

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

function slots<V>(view: TwoSlotView<V>, show: (v: V) => string): string[] {
  return view.slots.map((s) => {
    const mark = view.current === s.slot ? '  <- current' : '';
    if (s.state === 'empty') return `slot ${s.slot}: empty`;
    if (s.state === 'bad') return `slot ${s.slot}: invalid: ${s.error}`;
    return `slot ${s.slot}: ${show(s.value as V)}${mark}`;
  });
}

function block(lines: string[], name: string, body: string[]): void {
  body.forEach((b, i) => lines.push(`${(i === 0 ? name : '').padEnd(12)}${b}`));
}

function segmentLine(s: SegmentView): string {
  const info = s.info.value;
  const link = info ? (info.hasNext ? `next ${info.nextSeg}` : 'end of chain') : 'no valid segment_info';
  const infoSlots = s.info.slots.map((x) => (x.state === 'ok' ? `seq ${x.value!.seq}` : x.state)).join(' / ');
  const genSlots = s.gens.slots.map((x) => (x.state === 'ok' ? `seq ${x.value!.seq}` : x.state)).join(' / ');
  return `  ${String(s.cacheSeg).padStart(5)}  phys ${String(s.phys).padStart(5)}  ${link.padEnd(12)}  gen ${s.gen}  (info ${infoSlots}; gen ${genSlots})`;
}

function keyLine(k: KeyView): string {
  const flags = [k.clean ? 'CLEAN' : '', k.stale ? 'stale' : ''].filter(Boolean).join(' ');
  return (
    `    off ${k.off} len ${k.len} flags ${hex(k.flags)}${flags ? ` (${flags})` : ''} ` +
    `at ${k.seg}:${k.segOff} gen ${k.gen} data_crc 0x${hex32(k.dataCrc)}`
  );
}

export function formatDump(d: CacheDump): string {
  const lines: string[] = [`device      ${d.device} (${d.deviceSize} bytes)`];
  const sb = d.superblock;
  if (sb) {
    lines.push(
      `superblock  crc 0x${hex32(sb.crc)} flags ${hex(sb.flags)} magic ${sb.magic} seg_num ${sb.segNum}` +
        (sb.valid ? '' : `  (invalid: ${sb.error})`),
    );
  }
  if (d.cacheInfo) {
    block(
      lines,
      'cache_info',
      slots(d.cacheInfo, (v) =>
        `seq ${v.seq} seg_id ${v.segId} n_segs ${v.nSegs} flags ${hex(v.flags)} ` +
        `(data_crc ${v.dataCrc ? 'on' : 'off'}, init_done ${v.initDone ? 'yes' : 'no'}, ${v.cacheMode}, gc_percent ${v.gcPercent})`,
      ),
    );
  }
  for (const [name, view] of [['key_tail', d.keyTail], ['dirty_tail', d.dirtyTail]] as const) {
    if (view) block(lines, name, slots(view, (v) => `seq ${v.seq} ${v.seg}:${v.off}`));
  }
  if (d.segments.length > 0) {
    lines.push(`segments    ${d.segments.length} in the chain (cache id, physical id, link, generation)`);
    for (const s of d.segments) lines.push(segmentLine(s));
  }
  const log = d.log;
  if (log) {
    const dirty: Position | null = d.dirtyTail?.value ?? null;
    const s = d.summary;
    lines.push(
      `log         from key_tail ${formatPosition(log.from)}: ${s.ksets} ksets (${s.lastKsets} LAST), ${s.keys} keys ` +
        `(${s.dirtyKeys} dirty, ${s.cleanKeys} CLEAN, ${s.staleKeys} stale), ${s.logBytes} bytes`,
    );
    for (const k of log.ksets) {
      const mark = dirty && samePosition(k.pos, dirty) ? '  <- dirty_tail' : '';
      const at = `kset ${formatPosition(k.pos)} (device ${hex(k.deviceOffset)}) crc 0x${hex32(k.crc)}`;
      if (k.last) {
        lines.push(`  ${at} LAST: the log goes on at ${k.nextSeg}:0${mark}`);
        continue;
      }
      lines.push(`  ${at} ${k.keyNum} keys, ${k.size} bytes${mark}`);
      for (const key of k.keys) lines.push(keyLine(key));
    }
    const mark = dirty && samePosition(log.end, dirty) ? '  <- dirty_tail' : '';
    lines.push(`  end ${formatPosition(log.end)} (key_head): ${log.endNormal ? 'no further kset' : log.endReason}${mark}`);
  }
  for (const e of d.errors) lines.push(`error: ${e}`);
  return lines.join('\n') + '\n';
}

async function run(argv: string[], io: CliIo): Promise<number> {
  const args = parseArgs(argv, spec, { min: 1, max: 1, names: 'the cache device' });
  if (args.help) {
    io.out(help);
    return EXIT_OK;
  }
  const path = args.positionals[0]!;
  const dump = await withCacheDevice(path, { readOnly: true }, (medium) => dumpCache(medium));
  io.out(args.options.json ? JSON.stringify(dump, null, 2) + '\n' : formatDump(dump));
  if (dump.errors.length === 0) return EXIT_OK;
  io.err(`pcache: ${path}: the dump stopped early: ${dump.errors[0]}\n`);
  return EXIT_FAILURE;
}

export const command: Command = { summary: 'print the metadata and the log of a cache device', help, run };
