/**
 * A one-node Ceph cluster (one mon, one bluestore OSD on a sparse file) in a directory of its own,
 * with an RBD image exported over NBD by qemu-nbd's rbd driver. Shared by `npm run bench:ceph`
 * and test/ceph: everything lives under one directory, the ports are chosen free, and every daemon
 * runs in the foreground as a child of this process so that stop() ends it by PID.
 */
import { randomUUID } from 'node:crypto';
import { existsSync, promises as fsp, readdirSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { commandLine, endProc, running, startProc, waitNbd, type Proc, type Server } from '../nbd/servers.js';
import { run, sleep, type RunResult } from '../nbd/sys.js';

/** The Debian packages the cluster needs (ceph-mgr is not: the mon and the OSD serve RBD alone). */
export const CEPH_PACKAGES = ['ceph-mon', 'ceph-osd', 'ceph-common', 'qemu-block-extra', 'qemu-utils'] as const;

const TOOLS: Array<[string, (typeof CEPH_PACKAGES)[number]]> = [
  ['ceph-mon', 'ceph-mon'],
  ['ceph-osd', 'ceph-osd'],
  ['ceph', 'ceph-common'],
  ['rbd', 'ceph-common'],
  ['ceph-authtool', 'ceph-common'],
  ['monmaptool', 'ceph-common'],
  ['qemu-nbd', 'qemu-utils'],
];

function onPath(cmd: string): boolean {
  return (process.env.PATH ?? '').split(':').some((d) => d !== '' && existsSync(join(d, cmd)));
}

/** qemu's rbd block driver is a loadable module from qemu-block-extra. */
function haveQemuRbd(): boolean {
  for (const lib of ['/usr/lib', '/usr/lib64']) {
    if (!existsSync(lib)) continue;
    if (existsSync(join(lib, 'qemu', 'block-rbd.so'))) return true;
    for (const d of readdirSync(lib)) if (existsSync(join(lib, d, 'qemu', 'block-rbd.so'))) return true;
  }
  return false;
}

/** null when everything is installed, else what is missing and the command that installs it. */
export function cephMissing(): string | null {
  const missing = new Set<string>();
  for (const [cmd, pkg] of TOOLS) if (!onPath(cmd)) missing.add(pkg);
  if (!haveQemuRbd()) missing.add('qemu-block-extra');
  if (missing.size === 0) return null;
  return `Ceph is not installed (missing ${[...missing].join(', ')}); install it with: apt-get install -y ${CEPH_PACKAGES.join(' ')}`;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

export interface ClusterOptions {
  /** An empty directory that holds everything: configuration, keyrings, mon and OSD data, logs, sockets. */
  dir: string;
  /** The RBD image's size in bytes. */
  imageSize: number;
  /** The sparse file bluestore puts its block device on (default 20 GiB; only what is written takes space). */
  osdBytes?: number;
  /** Progress lines. */
  log?: (line: string) => void;
}

export interface QemuNbdOptions {
  id: string;
  label: string;
  socket: string;
  /** librbd's volatile in-memory write-back cache, kept even across flushes' absence (a reference, not persistent). */
  rbdCache?: boolean;
}

export interface CephCluster {
  readonly dir: string;
  readonly conf: string;
  /** `pool/image`. */
  readonly image: string;
  readonly imageSize: number;
  /** The daemons' PIDs (mon and OSD), for CPU accounting. */
  pids(): number[];
  /** qemu-nbd's `rbd:` file name for the image, with librbd options appended. */
  rbdSpec(options?: Record<string, string>): string;
  /** Run a Ceph client tool (ceph, rbd) against this cluster; rejects on a nonzero exit. */
  tool(cmd: 'ceph' | 'rbd', args: string[]): Promise<RunResult>;
  /** Export the image over NBD with qemu-nbd on a unix socket. */
  exportImage(opts: QemuNbdOptions): Promise<Server>;
  /** `rbd export` of the image into a local file. */
  exportToFile(path: string): Promise<void>;
  /** End every daemon by PID (SIGTERM, then SIGKILL); the directory stays for the caller to remove. */
  stop(): Promise<void>;
}

const KEYRING_ADMIN = 'ceph.client.admin.keyring';

function configText(dir: string, fsid: string, monAddr: string, osdBytes: number): string {
  return `[global]
fsid = ${fsid}
mon_host = ${monAddr}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
# A client whose mon is gone fails in 30 s instead of hanging for five minutes.
client_mount_timeout = 30
run_dir = ${dir}/run
log_file = ${dir}/log/$name.log
admin_socket = ${dir}/run/$name.asok
mon_data = ${dir}/mon/$cluster-$id
osd_data = ${dir}/osd/$cluster-$id
crash_dir = ${dir}/crash
exporter_sock_dir = ${dir}/run
ms_bind_ipv4 = true
ms_bind_ipv6 = false
public_addr = 127.0.0.1

[mon]
keyring = $mon_data/keyring
mon_cluster_log_file = ${dir}/log/cluster.log

[osd]
keyring = $osd_data/keyring
osd_objectstore = bluestore
bluestore_block_path = ${dir}/osd/$cluster-$id.block
bluestore_block_size = ${osdBytes}
bluestore_block_create = true
bluestore_cache_autotune = false
bluestore_cache_size = ${256 * 1024 * 1024}
osd_memory_target = ${1024 * 1024 * 1024}
osd_max_object_name_len = 256
osd_max_object_namespace_len = 64

[client]
keyring = ${dir}/${KEYRING_ADMIN}
# Several clients at once (qemu-nbd, rbd, ceph) would clash on one admin socket name.
admin_socket = ${dir}/run/$name.$pid.asok
log_file = ${dir}/log/$name.$pid.log
`;
}

async function must(cmd: string, args: string[], what: string): Promise<RunResult> {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${what} failed (${commandLine(cmd, args)} exited ${r.code ?? r.signal}): ${(r.stderr || r.stdout).trim().split('\n').slice(-4).join(' | ')}`);
  return r;
}

/** Poll `probe` until it returns true or `ms` pass; a daemon that died ends the wait at once. */
async function until(what: string, ms: number, daemons: Proc[], probe: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    for (const d of daemons) if (!running(d)) throw new Error(`${what}: ${d.log.split('/').pop()} shows the daemon exited: ${(await d.logText()).trim().split('\n').slice(-6).join(' | ')}`);
    if (await probe().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms / 1000} s`);
    await sleep(250);
  }
}

/**
 * Bootstrap the cluster: keyrings, monmap, mon, OSD (no ceph-volume: `ceph osd new`, then
 * `ceph-osd --mkfs` on a file bluestore creates), pool `rbd`, and an image with layering and
 * exclusive-lock. About 20 s. On any failure everything started so far is ended.
 */
export async function startCluster(opts: ClusterOptions): Promise<CephCluster> {
  const missing = cephMissing();
  if (missing) throw new Error(missing);
  const say = opts.log ?? (() => undefined);
  const dir = opts.dir;
  const conf = join(dir, 'ceph.conf');
  const fsid = randomUUID();
  const [v2, v1] = [await freePort(), await freePort()];
  const monAddr = `[v2:127.0.0.1:${v2},v1:127.0.0.1:${v1}]`;
  for (const sub of ['run', 'log', 'crash', 'mon', 'osd/ceph-0']) await fsp.mkdir(join(dir, sub), { recursive: true });
  await fsp.writeFile(conf, configText(dir, fsid, monAddr, opts.osdBytes ?? 20 * 1024 ** 3));
  const c = ['-c', conf];
  const daemons: Proc[] = [];
  const stopAll = async (): Promise<void> => {
    // The OSD first: it reports to the mon on the way down.
    for (const d of [...daemons].reverse()) {
      if (running(d)) d.child.kill('SIGTERM');
      await endProc(d, 10_000);
    }
  };
  const ceph = (args: string[], what: string): Promise<RunResult> => must('ceph', [...c, '--connect-timeout', '20', ...args], what);
  try {
    say(`ceph: bootstrapping a one-node cluster in ${dir} (mon on 127.0.0.1:${v2})`);
    const monKeyring = join(dir, 'mon.keyring');
    const adminKeyring = join(dir, KEYRING_ADMIN);
    await must('ceph-authtool', ['--create-keyring', monKeyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *'], 'the mon keyring');
    await must(
      'ceph-authtool',
      ['--create-keyring', adminKeyring, '--gen-key', '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow *'],
      'the admin keyring',
    );
    await must('ceph-authtool', [monKeyring, '--import-keyring', adminKeyring], 'importing the admin key');
    const monmap = join(dir, 'monmap');
    await must('monmaptool', ['--create', '--addv', 'a', monAddr, '--fsid', fsid, monmap], 'the monmap');
    await must('ceph-mon', [...c, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', monKeyring], 'ceph-mon --mkfs');
    const mon = startProc('ceph-mon', [...c, '-f', '-i', 'a'], { log: join(dir, 'log', 'mon.stdout') });
    daemons.push(mon);
    await until('the mon answering', 30_000, daemons, async () => (await run('ceph', [...c, '--connect-timeout', '2', 'mon', 'stat'])).code === 0);

    const osdUuid = randomUUID();
    const osdKey = (await must('ceph-authtool', ['--gen-print-key'], 'an OSD key')).stdout.trim();
    const osdSecret = join(dir, 'osd-secret.json');
    await fsp.writeFile(osdSecret, JSON.stringify({ cephx_secret: osdKey }), { mode: 0o600 });
    const osdId = (await ceph(['osd', 'new', osdUuid, '-i', osdSecret], 'ceph osd new')).stdout.trim();
    if (osdId !== '0') throw new Error(`ceph osd new gave OSD id '${osdId}', expected 0`);
    const osdData = join(dir, 'osd', 'ceph-0');
    await must('ceph-authtool', ['--create-keyring', join(osdData, 'keyring'), '--name', 'osd.0', '--add-key', osdKey], 'the OSD keyring');
    await must('ceph-osd', [...c, '-i', '0', '--mkfs', '--osd-uuid', osdUuid], 'ceph-osd --mkfs');
    const osd = startProc('ceph-osd', [...c, '-f', '-i', '0'], { log: join(dir, 'log', 'osd.stdout') });
    daemons.push(osd);
    await until('the OSD coming up', 60_000, daemons, async () => {
      const r = await run('ceph', [...c, '--connect-timeout', '5', 'osd', 'stat', '-f', 'json']);
      return r.code === 0 && (JSON.parse(r.stdout) as { num_up_osds?: number }).num_up_osds === 1;
    });

    await ceph(['osd', 'pool', 'create', 'rbd', '8', '8'], 'creating pool rbd');
    await ceph(['osd', 'pool', 'set', 'rbd', 'size', '1', '--yes-i-really-mean-it'], 'pool rbd size 1');
    await must('rbd', [...c, 'pool', 'init', 'rbd'], 'rbd pool init');
    await must('rbd', [...c, 'create', '--size', `${Math.ceil(opts.imageSize / 1024 ** 2)}M`, '--image-feature', 'layering,exclusive-lock', 'rbd/img'], 'rbd create');
    say('ceph: cluster up, image rbd/img created');
  } catch (err) {
    await stopAll();
    throw err;
  }

  const cluster: CephCluster = {
    dir,
    conf,
    image: 'rbd/img',
    imageSize: opts.imageSize,
    pids: () => daemons.filter(running).map((d) => d.child.pid!),
    rbdSpec(options = {}) {
      return ['rbd:rbd/img', `conf=${conf}`, 'id=admin', ...Object.entries(options).map(([k, v]) => `${k}=${v}`)].join(':');
    },
    tool: (cmd, args) => must(cmd, [...c, ...args], `${cmd} ${args[0] ?? ''}`),
    async exportImage(q) {
      await fsp.rm(q.socket, { force: true });
      // --cache=none makes qemu set rbd_cache=false; writeback sets it true, and the option keeps
      // librbd from writing through until the first flush, so that it caches from the start.
      const spec = q.rbdCache ? cluster.rbdSpec({ rbd_cache: 'true', rbd_cache_writethrough_until_flush: 'false' }) : cluster.rbdSpec();
      const args = ['-f', 'raw', `--cache=${q.rbdCache ? 'writeback' : 'none'}`, '--persistent', '--shared=16', '-k', q.socket, spec];
      const p = startProc('qemu-nbd', args, { log: join(dir, 'log', `qemu-nbd-${q.id}.log`) });
      try {
        await waitNbd(q.socket, p, `qemu-nbd (${q.label})`);
      } catch (err) {
        await endProc(p, 0);
        throw err;
      }
      return {
        id: q.id,
        label: q.label,
        uri: `nbd+unix:///?socket=${q.socket}`,
        commands: [commandLine('qemu-nbd', args)],
        cacheDev: null,
        pids: () => [...(running(p) ? [p.child.pid!] : []), ...cluster.pids()],
        // fio's --end_fsync makes every write case durable on every server alike.
        settle: async () => undefined,
        dropCaches: async () => undefined,
        async stop() {
          if (running(p)) p.child.kill('SIGTERM');
          await endProc(p, 10_000);
          await fsp.rm(q.socket, { force: true });
        },
      };
    },
    async exportToFile(path) {
      await fsp.rm(path, { force: true });
      await must('rbd', [...c, 'export', 'rbd/img', path], 'rbd export');
    },
    stop: stopAll,
  };
  return cluster;
}
