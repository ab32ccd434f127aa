import { randomUUID } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { join } from 'node:path';
import { SnapshiftError } from '../../core/errors.ts';
import { exec } from '../../core/exec.ts';
import { snapshiftProcessIsAlive } from '../../core/process-alive.ts';
import { endOwnedProcess, isOwnedProcessAlive, readCmdline, sleep, type OwnedProcess } from '../../core/owned-process.ts';
import type { QemuVmConfiguration } from '../../hypervisor/hypervisor.ts';
import { connectQmp } from '../../hypervisor/qemu/qmp-connect.ts';
import type { RestorePointSummary } from '../../repository/index.ts';
import { launchFiles, launchQemu, qemuLaunchArgs, randomMac, type LaunchDisk } from '../vm/qemu-launch.ts';
import { startDetachedServer } from './detached-server.ts';
import { listRecords, readRecord, recoveryFolder, vmRunFolder, writeRecord, type InstantRecoveryRecord } from './recovery-state.ts';

/**
 * How long QEMU's NBD client holds the VM's reads while the server is away before failing them (and, with
 * rerror=stop, pausing the guest): a server restarted within this time is never noticed by the guest.
 */
const reconnectDelaySeconds = 5;

export interface StartInstantRecoveryOptions {
  home: string;
  /** The restore point (already read from the repository by the caller). */
  point: RestorePointSummary;
  configuration: QemuVmConfiguration;
  repository: string;
  password?: string;
  /** The recovered VM's name; default the source VM's. */
  name: string;
  /** New UUID and MAC addresses: a recovery beside a VM that may still run. */
  newIdentity: boolean;
  network: 'none' | 'user';
  purpose: InstantRecoveryRecord['purpose'];
}

/**
 * Boots a VM from a restore point without restoring it first: `snapshift serve` serves its disks read-only
 * from the repository, and QEMU runs the VM on a local qcow2 overlay per disk whose backing is that NBD
 * export; the guest's writes stay in the overlays. A read the server cannot answer (it died) waits
 * `reconnectDelaySeconds` for it, then fails, and the disk's `rerror=stop` pauses the guest rather than
 * hand it an error or stale data; `resume` restarts the server and continues the guest.
 */
export async function startInstantRecovery(options: StartInstantRecoveryOptions): Promise<InstantRecoveryRecord> {
  const { home, point, name } = options;
  const existing = await readRecord(home, name);
  if (existing) {
    if (await isOwnedProcessAlive(existing.vm)) {
      throw new SnapshiftError('INSTANT_RECOVERY_EXISTS', `an instant recovery named ${name} runs already (restore point ${existing.restorePoint}); stop it first, or pass --name`);
    }
    await discard(home, existing); // A recovery whose VM is gone (a crash, a reboot): nothing of it is worth keeping.
  }
  const folder = recoveryFolder(home, name);
  const runDir = vmRunFolder(home, name);
  await fs.mkdir(folder, { recursive: true, mode: 0o700 });
  await fs.rm(runDir, { recursive: true, force: true });
  await fs.mkdir(runDir, { recursive: true, mode: 0o700 });
  const socketPath = join(folder, 'nbd.sock');
  const record: InstantRecoveryRecord = {
    version: 1,
    name,
    sourceVm: point.vmName,
    restorePoint: point.id,
    pointCreatedAt: point.createdAt,
    repository: options.repository,
    startedAt: new Date().toISOString(),
    startedBy: process.pid,
    state: 'running',
    server: { label: `nbd-server:${name}`, pid: 0, cmdline: [], socketPath },
    vm: { label: `vm:${name}`, pid: 0, cmdline: [], qmpSocketPath: launchFiles(runDir).qmpSocket, runDir },
    disks: point.disks.map((disk) => ({ name: disk.name, sizeBytes: disk.sizeBytes, overlayPath: join(folder, `${disk.name}.overlay.qcow2`), nodeName: `${disk.name}-overlay`, backupNodeName: `${disk.name}-backup` })),
    launch: {
      uuid: options.newIdentity || !options.configuration.uuid ? randomUUID() : options.configuration.uuid,
      macs: (options.configuration.nics ?? []).map((nic) => (options.newIdentity ? randomMac() : nic.mac)),
      network: options.network,
      configuration: options.configuration,
    },
    purpose: options.purpose,
  };
  try {
    record.server = await startDetachedServer({
      vmName: point.vmName,
      pointId: point.id,
      repository: options.repository,
      socketPath,
      folder,
      ...(options.password !== undefined ? { password: options.password } : {}),
      // From here on `stop` (or the next start) finds the server even if we die.
      onSpawned: async (server) => {
        record.server = server;
        await writeRecord(home, record);
      },
    });
    for (const disk of record.disks) {
      const backing = `nbd+unix:///${encodeURIComponent(disk.name)}?socket=${socketPath}`;
      await exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-u', '-F', 'raw', '-b', backing, disk.overlayPath, String(disk.sizeBytes)]);
    }
    const devices = new Map(options.configuration.disks.map((disk) => [disk.name, disk.device ?? null]));
    const launchDisks: LaunchDisk[] = record.disks.map((disk) => ({
      name: disk.name,
      device: devices.get(disk.name) ?? null,
      nodes: [
        { driver: 'nbd', 'node-name': disk.backupNodeName, server: { type: 'unix', path: socketPath }, export: disk.name, 'reconnect-delay': reconnectDelaySeconds, 'read-only': true },
        { driver: 'file', 'node-name': `${disk.name}-overlay-file`, filename: disk.overlayPath },
        { driver: 'qcow2', 'node-name': disk.nodeName, file: `${disk.name}-overlay-file`, backing: disk.backupNodeName },
      ],
      topNodeName: disk.nodeName,
      stopOnError: true,
    }));
    const args = qemuLaunchArgs({ ...record.launch, name, runDir, disks: launchDisks });
    const { pid } = await launchQemu(runDir, args);
    record.vm = { ...record.vm, pid, cmdline: (await readCmdline(pid)) ?? [] };
    await writeRecord(home, record);
    return record;
  } catch (error) {
    await discard(home, record).catch(() => undefined);
    throw error;
  }
}

export interface InstantRecoveryStatus {
  record: InstantRecoveryRecord;
  vmRunning: boolean;
  serverRunning: boolean;
  /** QEMU's run state (running, paused, io-error, …), or null when it cannot be asked. */
  vmStatus: string | null;
}

export async function statusOf(record: InstantRecoveryRecord): Promise<InstantRecoveryStatus> {
  const vmRunning = await isOwnedProcessAlive(record.vm);
  const serverRunning = await isOwnedProcessAlive(record.server);
  let vmStatus: string | null = null;
  if (vmRunning) {
    try {
      await using qmp = await connectQmp(record.name, record.vm.qmpSocketPath, 2_000);
      vmStatus = (await qmp.execute<{ status: string }>('query-status')).status;
    } catch {
      vmStatus = null; // Someone else holds its one QMP connection.
    }
  }
  return { record, vmRunning, serverRunning, vmStatus };
}

/** Powers the VM off (no guest shutdown: its writes are discarded anyway), stops serving, removes the overlays. */
export async function stopInstantRecovery(home: string, name: string): Promise<InstantRecoveryRecord> {
  const record = await readRecord(home, name);
  if (!record) throw new SnapshiftError('INSTANT_RECOVERY_UNKNOWN', `no instant recovery named ${name} (snapshift instant-recovery list shows what runs)`);
  await discard(home, record);
  return record;
}

/**
 * Brings a recovery back after its NBD server died: serves the restore point again on the same socket
 * (QEMU's NBD client reconnects by itself) and continues a guest that paused on a failed read.
 */
export async function resumeInstantRecovery(home: string, name: string, password: string | undefined): Promise<InstantRecoveryStatus> {
  const record = await readRecord(home, name);
  if (!record) throw new SnapshiftError('INSTANT_RECOVERY_UNKNOWN', `no instant recovery named ${name} (snapshift instant-recovery list shows what runs)`);
  if (!(await isOwnedProcessAlive(record.vm))) throw new SnapshiftError('INSTANT_RECOVERY_UNKNOWN', `the VM of instant recovery ${name} no longer runs; stop it and start again`);
  if (record.state === 'running' && !(await isOwnedProcessAlive(record.server))) {
    await fs.rm(record.server.socketPath, { force: true });
    const folder = recoveryFolder(home, name);
    record.server = await startDetachedServer({ vmName: record.sourceVm, pointId: record.restorePoint, repository: record.repository, socketPath: record.server.socketPath, folder, ...(password !== undefined ? { password } : {}) });
    await writeRecord(home, record);
  }
  await continueAfterIoError(record);
  return statusOf(record);
}

/**
 * Continues a guest paused on a failed read until it stays running. QEMU's NBD client reconnects on its
 * own schedule (its retries back off up to 16 s), so a `cont` before it has may fail the read again and
 * pause the guest again: keep continuing until the guest has run for a few seconds in a row.
 */
async function continueAfterIoError(record: InstantRecoveryRecord, timeoutMs = 60_000): Promise<void> {
  await using qmp = await connectQmp(record.name, record.vm.qmpSocketPath, 10_000);
  const deadline = Date.now() + timeoutMs;
  let runningChecks = 0;
  while (runningChecks < 3) {
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status === 'io-error') {
      runningChecks = 0;
      if (Date.now() > deadline) throw new SnapshiftError('INSTANT_RECOVERY_SERVER_FAILED', `${record.name} still pauses on failed reads ${timeoutMs} ms after its server came back`);
      await qmp.execute('cont');
    } else {
      runningChecks++;
    }
    await sleep(1_000);
  }
}

/** What `hunt` did (or, in a dry run, would do) about an instant recovery whose VM no longer runs. */
export interface RecoveryHuntAction {
  name: string;
  action: 'removed-recovery' | 'would-remove-recovery';
  detail: string;
}

/**
 * Removes the recoveries whose VM has gone (powered off from inside, killed, the host rebooted): their
 * server, if it still runs, and their overlays. A recovery whose `start` is still under way is left alone.
 */
export async function huntInstantRecoveries(home: string, options: { dryRun: boolean }): Promise<RecoveryHuntAction[]> {
  const actions: RecoveryHuntAction[] = [];
  for (const record of await listRecords(home)) {
    if (record.state !== 'running' || (await isOwnedProcessAlive(record.vm))) continue;
    if (record.vm.pid === 0 && record.startedBy !== undefined && snapshiftProcessIsAlive(record.startedBy)) continue;
    const detail = `its VM no longer runs; overlays ${record.disks.map((disk) => disk.overlayPath).join(', ')}`;
    if (options.dryRun) {
      actions.push({ name: record.name, action: 'would-remove-recovery', detail });
      continue;
    }
    await discard(home, record);
    actions.push({ name: record.name, action: 'removed-recovery', detail });
  }
  return actions;
}

/**
 * The VM of a recovery whose `start` died between launching QEMU and recording it: QEMU's PID file in the
 * run folder names it, and it is ours only if its command line has this recovery's QMP socket.
 */
async function vmFromPidFile(record: InstantRecoveryRecord): Promise<OwnedProcess> {
  const pid = Number((await fs.readFile(launchFiles(record.vm.runDir).pidFile, 'utf8').catch(() => '')).trim());
  const cmdline = Number.isSafeInteger(pid) && pid > 0 ? await readCmdline(pid) : undefined;
  if (!cmdline?.some((arg) => arg.includes(record.vm.qmpSocketPath))) return record.vm;
  return { ...record.vm, pid, cmdline };
}

/** Ends what a recovery started (each step also when an earlier one failed) and removes its files. */
async function discard(home: string, record: InstantRecoveryRecord): Promise<void> {
  const problems: string[] = [];
  const end = async (process: OwnedProcess) => {
    if (process.pid > 0) await endOwnedProcess(process, { graceMs: 5_000 }).catch((error: Error) => problems.push(`${process.label}: ${error.message}`));
  };
  await end(record.vm.pid > 0 ? record.vm : await vmFromPidFile(record));
  await end(record.server);
  if (problems.length > 0) throw new SnapshiftError('INSTANT_RECOVERY_SERVER_FAILED', `instant recovery ${record.name}: could not end ${problems.join('; ')}`);
  await fs.rm(recoveryFolder(home, record.name), { recursive: true, force: true });
  if (record.state === 'running') await fs.rm(record.vm.runDir, { recursive: true, force: true });
}
