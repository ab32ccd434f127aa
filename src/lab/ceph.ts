import { randomUUID } from 'node:crypto';
import { closeSync, openSync, promises as fs } from 'node:fs';
import { createServer } from 'node:net';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { SnapshiftError, messageOf } from '../core/errors.ts';
import { exec, type ExecResult } from '../core/exec.ts';
import { Lab } from './lab.ts';
import { LabLayout, defaultLabDir } from './lab-layout.ts';
import { emptyLabState, readLabState, withStateLock, writeLabState, type ProcessRecord } from './lab-state.ts';
import { endOwnedProcess, isOwnedProcessAlive, sleep } from './owned-process.ts';
import { pathExists } from '../core/fs-probe.ts';

export interface CephUpOptions {
  /** Lab folder; Ceph lives in `<lab>/ceph/`. Default ./.snapshift-lab. */
  dir?: string;
  /** The monitor's msgr2 port on 127.0.0.1; default a free port (never Ceph's 3300/6789). */
  port?: number;
  /** Sparse size of the OSD's bluestore file; default 4 GiB. */
  osdSizeBytes?: number;
  /** How long the mon and the OSD may take to come up; default 60 s each. */
  readyTimeoutMs?: number;
}

export interface CephStatus {
  labDir: string;
  /** True when the config exists and every recorded Ceph daemon runs. */
  up: boolean;
  confPath: string;
  pool: string;
  processes: Array<ProcessRecord & { running: boolean }>;
}

export interface CephDownReport {
  labDir: string;
  wasUp: boolean;
  endedPids: number[];
}

/** Process labels in the lab state: every Ceph daemon is `ceph:<name>`. */
const processLabelPrefix = 'ceph:';
/** The pool the lab creates and initialises for RBD. */
export const labCephPool = 'rbd';

/** `<lab>/ceph/ceph.conf`: what clients need (`rbd -c`, QEMU's rbd `conf=`, CEPH_CONF). */
export function cephConfPath(labDir: string = defaultLabDir): string {
  return path.join(cephDirOf(labDir), 'ceph.conf');
}

function cephDirOf(labDir: string): string {
  return path.join(new LabLayout(labDir).dir, 'ceph');
}

/**
 * A single-node Ceph cluster for the lab: 1 monitor, 1 manager, 1 OSD (bluestore on a sparse file), on
 * loopback, `auth none`, with an RBD pool. Everything lives in `<lab>/ceph/`; each daemon runs in the
 * foreground (so its PID is the one we start) and is recorded in the lab state before we wait on it, so
 * `down` (or `lab down`) ends exactly those PIDs, even after the process that started them crashed.
 */
export class LabCeph {
  readonly labDir: string;
  readonly dir: string;
  readonly confPath: string;
  readonly pool = labCephPool;

  private constructor(labDir: string) {
    this.labDir = new LabLayout(labDir).dir;
    this.dir = cephDirOf(labDir);
    this.confPath = cephConfPath(labDir);
  }

  /** Brings Ceph up in `<lab>/ceph/` (or returns the one already up there); a failed up leaves nothing. */
  static async up(options: CephUpOptions = {}): Promise<LabCeph> {
    const labDir = options.dir ?? defaultLabDir;
    const ceph = new LabCeph(labDir);
    const status = await LabCeph.status(labDir);
    if (status.up) return ceph;
    if (status.processes.length > 0 || (await pathExists(ceph.dir))) {
      throw new SnapshiftError('LAB_BROKEN', `Ceph in ${ceph.dir} is half up; run "snapshift lab ceph down --dir ${ceph.labDir}" first`);
    }
    const lab = await openOrCreateLab(ceph.labDir);
    try {
      await ceph.#bootstrap(lab, options);
      return ceph;
    } catch (error) {
      try {
        await LabCeph.down(labDir);
      } catch (cleanupError) {
        throw new SnapshiftError('LAB_UP_FAILED', `Ceph up failed (${messageOf(error)}) and cleaning up failed too (${messageOf(cleanupError)}); run "snapshift lab ceph down --dir ${ceph.labDir}"`, { cause: error });
      }
      throw error;
    }
  }

  /** The Ceph already up in the lab at `labDir`; fails with a clear message if there is none. */
  static async open(labDir: string = defaultLabDir): Promise<LabCeph> {
    if (!(await LabCeph.status(labDir)).up) throw new SnapshiftError('LAB_CEPH_NOT_UP', `no Ceph is up in ${cephDirOf(labDir)} (run "snapshift lab ceph up --dir ${labDir}")`);
    return new LabCeph(labDir);
  }

  static async status(labDir: string = defaultLabDir): Promise<CephStatus> {
    const ceph = new LabCeph(labDir);
    const state = await readLabState(new LabLayout(labDir).stateFile);
    const records = (state?.processes ?? []).filter((p) => p.label.startsWith(processLabelPrefix));
    const processes = await Promise.all(records.map(async (p) => ({ ...p, running: await isOwnedProcessAlive(p) })));
    const up = processes.length === 3 && processes.every((p) => p.running) && (await pathExists(ceph.confPath));
    return { labDir: ceph.labDir, up, confPath: ceph.confPath, pool: ceph.pool, processes };
  }

  /**
   * Ends the recorded Ceph daemons (by PID, only while /proc/PID/cmdline still matches) and removes
   * `<lab>/ceph/`. If nothing else of the lab remains, the lab folder goes too.
   */
  static async down(labDir: string = defaultLabDir): Promise<CephDownReport> {
    const layout = new LabLayout(labDir);
    const report: CephDownReport = { labDir: layout.dir, wasUp: false, endedPids: [] };
    const state = await readLabState(layout.stateFile);
    if (state) {
      const lab = await Lab.open(layout.dir);
      // OSD first, monitor last, as Ceph itself stops; the data is discarded, so no grace is needed.
      for (const process of state.processes.filter((p) => p.label.startsWith(processLabelPrefix)).reverse()) {
        report.wasUp = true;
        if (await endOwnedProcess(process, { signal: 'SIGKILL' })) report.endedPids.push(process.pid);
        await lab.forgetProcess(process.label);
      }
    }
    const dir = cephDirOf(layout.dir);
    if (await pathExists(dir)) report.wasUp = true;
    await fs.rm(dir, { recursive: true, force: true });
    const remaining = await readLabState(layout.stateFile);
    if (remaining && remaining.datastores.length === 0 && remaining.vms.length === 0 && remaining.processes.length === 0) await Lab.down(layout.dir);
    return report;
  }

  /** `LabCeph.down` of this cluster. */
  async down(): Promise<CephDownReport> {
    return LabCeph.down(this.labDir);
  }

  /** Runs the rbd CLI against this cluster. */
  rbd(args: readonly string[], options: { timeoutMs?: number } = {}): Promise<ExecResult> {
    return exec('rbd', ['-c', this.confPath, ...args], { timeoutMs: options.timeoutMs ?? 120_000, code: 'CEPH_COMMAND_FAILED' });
  }

  /** Runs the ceph CLI against this cluster. */
  ceph(args: readonly string[], options: { timeoutMs?: number } = {}): Promise<ExecResult> {
    return exec('ceph', ['-c', this.confPath, ...args], { timeoutMs: options.timeoutMs ?? 60_000, code: 'CEPH_COMMAND_FAILED' });
  }

  /** Environment for child processes that should use this cluster (snapshift's rbd provider, rbd, ceph). */
  get env(): { CEPH_CONF: string; SNAPSHIFT_CEPH_CONF: string } {
    return { CEPH_CONF: this.confPath, SNAPSHIFT_CEPH_CONF: this.confPath };
  }

  async #bootstrap(lab: Lab, options: CephUpOptions): Promise<void> {
    const readyTimeoutMs = options.readyTimeoutMs ?? 60_000;
    for (const sub of ['run', 'log', 'mon/ceph-a', 'mgr/ceph-x', 'osd/ceph-0']) await fs.mkdir(path.join(this.dir, sub), { recursive: true });
    const port = options.port ?? (await freePort());
    const fsid = randomUUID();
    await fs.writeFile(this.confPath, cephConf({ dir: this.dir, fsid, port, osdSizeBytes: options.osdSizeBytes ?? 4 * 1024 ** 3 }));
    const keyring = path.join(this.dir, 'keyring');
    const monmap = path.join(this.dir, 'monmap');
    // `auth none`, but the monitor's mkfs still wants a keyring holding mon. and client.admin.
    await exec('ceph-authtool', ['--create-keyring', keyring, '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *']);
    await exec('ceph-authtool', [keyring, '--gen-key', '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd', 'allow *', '--cap', 'mgr', 'allow *']);
    await exec('monmaptool', ['--create', '--addv', 'a', `[v2:127.0.0.1:${port}]`, '--fsid', fsid, monmap]);
    await exec('ceph-mon', ['-c', this.confPath, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', keyring]);
    await this.#startDaemon(lab, 'mon.a', 'ceph-mon', ['-i', 'a']);
    await this.#waitFor('the monitor to answer', readyTimeoutMs, async () => {
      await this.ceph(['-s', '--connect-timeout', '2'], { timeoutMs: 10_000 });
      return true;
    });
    await this.#startDaemon(lab, 'mgr.x', 'ceph-mgr', ['-i', 'x']);
    const osdUuid = randomUUID();
    const osdId = (await this.ceph(['osd', 'new', osdUuid])).stdout.trim();
    await exec('ceph-osd', ['-c', this.confPath, '-i', osdId, '--mkfs', '--osd-uuid', osdUuid], { timeoutMs: 120_000 });
    await this.#startDaemon(lab, `osd.${osdId}`, 'ceph-osd', ['-i', osdId]);
    await this.#waitFor('the OSD to come up', readyTimeoutMs, async () => {
      const stat = JSON.parse((await this.ceph(['osd', 'stat', '-f', 'json'])).stdout) as { num_up_osds?: number; osdmap?: { num_up_osds?: number } };
      return (stat.num_up_osds ?? stat.osdmap?.num_up_osds ?? 0) >= 1;
    });
    await this.ceph(['osd', 'pool', 'create', this.pool, '8', '8']);
    await this.rbd(['pool', 'init', this.pool]);
  }

  /** Starts a daemon in the foreground (`-f`), detached from us, and records its PID before anything else. */
  async #startDaemon(lab: Lab, name: string, program: string, args: readonly string[]): Promise<void> {
    const argv = ['-f', '-c', this.confPath, ...args];
    const log = openSync(path.join(this.dir, 'log', `${name}.out`), 'a');
    try {
      const child = spawn(program, argv, { detached: true, stdio: ['ignore', log, log] });
      const pid = await new Promise<number>((resolve, reject) => {
        child.once('spawn', () => resolve(child.pid!));
        child.once('error', (error) => reject(new SnapshiftError('PROGRAM_MISSING', `cannot start ${program} (${error.message}); install ceph-mon ceph-osd ceph-mgr ceph-common (bash scripts/setup.sh)`, { cause: error })));
      });
      child.unref();
      await lab.recordProcess({ label: `${processLabelPrefix}${name}`, pid, cmdline: [program, ...argv], startedAt: new Date().toISOString() });
    } finally {
      closeSync(log);
    }
  }

  async #waitFor(what: string, timeoutMs: number, ready: () => Promise<boolean>): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let lastError = '';
    for (;;) {
      try {
        if (await ready()) return;
      } catch (error) {
        lastError = messageOf(error);
      }
      for (const process of (await LabCeph.status(this.labDir)).processes) {
        if (!process.running) throw new SnapshiftError('LAB_CEPH_FAILED', `Ceph ${process.label.slice(processLabelPrefix.length)} exited while waiting for ${what}; see ${path.join(this.dir, 'log')}`);
      }
      if (Date.now() >= deadline) throw new SnapshiftError('LAB_CEPH_FAILED', `timed out after ${timeoutMs} ms waiting for ${what}${lastError ? ` (${lastError})` : ''}; see ${path.join(this.dir, 'log')}`);
      await sleep(200);
    }
  }
}

/** ceph.conf of the single-node cluster: loopback msgr2 only, no auth, pool size 1, all state under `dir`. */
function cephConf(options: { dir: string; fsid: string; port: number; osdSizeBytes: number }): string {
  const { dir } = options;
  return `[global]
fsid = ${options.fsid}
mon initial members = a
mon host = v2:127.0.0.1:${options.port}
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
ms bind msgr1 = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# Every RBD snapshot id is a monitor proposal; the default 1 s between proposals makes "rbd snap create"
# take 0.7-1 s here, 0.1 s with these (a one-monitor lab has nobody to batch proposals with).
paxos propose interval = 0.05
paxos min wait = 0.01
osd crush chooseleaf type = 0
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${dir}/log/$name.log
pid file = ${dir}/run/$name.pid
keyring = ${dir}/keyring
mon data = ${dir}/mon/ceph-$id
mgr data = ${dir}/mgr/ceph-$id
osd data = ${dir}/osd/ceph-$id
osd objectstore = bluestore
bluestore block path = ${dir}/osd/ceph-$id/block.file
bluestore block create = true
bluestore block size = ${options.osdSizeBytes}
bluestore fsck on mount = false
osd memory target = 1073741824
bluestore cache autotune = false
bluestore cache size = 134217728
mgr modules =
mgr initial modules =

[client]
# Daemons keep their admin sockets; clients (rbd, QEMU's librbd) would all race for client.admin.asok.
admin socket =
`;
}

/** A lab state to record processes in: the lab's own if it is up, else an empty one (Ceph alone). */
async function openOrCreateLab(labDir: string): Promise<Lab> {
  const layout = new LabLayout(labDir);
  await fs.mkdir(layout.dir, { recursive: true });
  await withStateLock(layout.stateFile, async () => {
    if (!(await readLabState(layout.stateFile))) await writeLabState(layout.stateFile, emptyLabState(layout.dir));
  });
  return Lab.open(layout.dir);
}

/** A TCP port free on 127.0.0.1 now (the kernel picks it from the ephemeral range, far from Ceph's defaults). */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}
