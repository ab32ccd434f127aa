import { existsSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { VmSnapshotLedgerEntry } from '../../catalog/catalog.ts';
import { exec } from '../../core/exec.ts';
import { SnapshiftError, messageOf } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { HuntAction, HuntOptions } from '../hypervisor.ts';
import { isProtectedDisk } from './libvirt-disks.ts';
import { deleteCheckpoint } from './libvirt-cbt.ts';
import { chainKeyOfCheckpoint, tagInName } from './libvirt-names.ts';
import { commitLibvirtOverlay } from './libvirt-vm-snapshot.ts';
import type { LibvirtDisk } from './libvirt-xml.ts';
import type { LibvirtDomainSummary, Virsh } from './virsh.ts';

/** The domain a ledger row names, as libvirt sees it now: running, defined but not running, gone, or unknown. */
type DomainNow = { kind: 'running'; disks: LibvirtDisk[] } | { kind: 'stopped'; state: string } | { kind: 'gone' } | { kind: 'unreachable'; why: string };

async function domainNow(virsh: Virsh, name: string): Promise<DomainNow> {
  let domains: LibvirtDomainSummary[];
  try {
    domains = await virsh.listDomains();
  } catch (error) {
    return { kind: 'unreachable', why: messageOf(error) };
  }
  // By name only: a transient domain created again from its XML may have a new UUID and still run on our
  // overlay; what is done to a disk is decided by the path it runs on, never by the name alone.
  const domain = domains.find((candidate) => candidate.name === name);
  if (!domain) return { kind: 'gone' };
  if (domain.state === 'shut-off') return { kind: 'stopped', state: domain.state };
  return { kind: 'running', disks: await virsh.disks(name) };
}

function text(details: Record<string, unknown> | undefined, key: string): string | undefined {
  const value = details?.[key];
  return typeof value === 'string' ? value : undefined;
}

/**
 * Undoes what one ledger row of a crashed libvirt task left. A VM snapshot: an overlay the domain still runs
 * on is committed live (a commit job the task had started is finished); an overlay of a domain that is gone
 * is committed offline with qemu-img (which refuses while anyone holds the image); a file nothing uses goes.
 * A fleecing: its backup job (found by our socket) is aborted, and scratch files libvirt left are removed.
 * Then the checkpoint the task had created (named with its tag) is deleted: its restore point was never
 * committed, so nothing will read from it, and libvirt merges its bitmaps into its parent's (the chain's
 * checkpoint), so every write since the chain's last backup stays tracked.
 */
export async function repairLibvirtLedgerEntry(virsh: Virsh, entry: VmSnapshotLedgerEntry, options: HuntOptions): Promise<HuntAction[]> {
  const actions = await repairLedgerOperation(virsh, entry, options);
  const domainName = text(entry.adapter, 'domain')!;
  if (actions.some((action) => action.action === 'left-in-place')) return actions; // the checkpoint waits for the next hunt
  actions.push(...(await removeSessionCheckpoints(virsh, domainName, entry, options)));
  return actions;
}

/**
 * Deletes the checkpoints of the ledger row's session (`snapshift-<chainKey>-<tag>`) on a running domain,
 * after aborting a changed-block query job of that session (libvirt deletes no checkpoint under a backup job).
 */
async function removeSessionCheckpoints(virsh: Virsh, domainName: string, entry: VmSnapshotLedgerEntry, options: HuntOptions): Promise<HuntAction[]> {
  const tag = entry.sessionId.slice(0, 8);
  if (options.isLiveTag(tag)) return [];
  const now = await domainNow(virsh, domainName);
  if (now.kind !== 'running') return []; // the next backup's plan deletes it, once the domain runs
  const checkpoints = (await virsh.checkpointNames(domainName)).filter((name) => chainKeyOfCheckpoint(name) !== undefined && name.endsWith(`-${tag}`));
  if (checkpoints.length === 0) return [];
  const actions: HuntAction[] = [];
  const job = await virsh.backupJob(domainName);
  const jobSocket = job?.server?.socketPath;
  if (jobSocket !== undefined && tagInName(jobSocket) === tag) {
    if (!options.dryRun) await virsh.jobAbort(domainName);
    actions.push({ vmName: entry.vmName, overlayPath: jobSocket, action: 'removed-export', detail: `pull backup job of session ${tag}, which no longer runs, aborted` });
  }
  for (const name of checkpoints) {
    try {
      if (!options.dryRun) await deleteCheckpoint(virsh, domainName, name);
      actions.push({ vmName: entry.vmName, overlayPath: name, action: 'removed-checkpoint', detail: `checkpoint of session ${tag}, which never made its restore point, deleted (its bitmaps merged into its parent's)` });
    } catch (error) {
      actions.push({ vmName: entry.vmName, overlayPath: name, action: 'left-in-place', detail: `checkpoint of session ${tag} could not be deleted: ${messageOf(error)}` });
    }
  }
  return actions;
}

async function repairLedgerOperation(virsh: Virsh, entry: VmSnapshotLedgerEntry, options: HuntOptions): Promise<HuntAction[]> {
  const domainName = text(entry.adapter, 'domain');
  if (!domainName) throw new SnapshiftError('LEDGER_ENTRY_BAD', `ledger row ${entry.id} of ${entry.vmName} names no libvirt domain`);
  const now = await domainNow(virsh, domainName);
  const tag = entry.sessionId.slice(0, 8);
  const actions: HuntAction[] = [];
  const act = (overlayPath: string, action: HuntAction['action'], detail: string) => actions.push({ vmName: entry.vmName, overlayPath, action, detail });

  if (text(entry.adapter, 'operation') === 'fleecing') {
    const socketPath = text(entry.adapter, 'socketPath');
    if (now.kind === 'unreachable') {
      for (const file of entry.overlays) act(file.overlayPath, 'left-in-place', `libvirt does not answer (${now.why})`);
      return actions;
    }
    if (now.kind === 'running') {
      const job = await virsh.backupJob(domainName);
      if (job && socketPath !== undefined && job.server?.socketPath === socketPath) {
        if (options.isLiveTag(tag)) {
          act(socketPath, 'left-in-place', `backup job of session ${tag}, which still runs`);
          return actions;
        }
        if (!options.dryRun) await virsh.jobAbort(domainName);
        act(socketPath, 'removed-fleecing', `pull backup job of ${domainName} (fleecing of a session that is no longer running) aborted`);
      }
    }
    for (const file of entry.overlays) {
      if (!existsSync(file.overlayPath)) continue;
      if (!options.dryRun) await rm(file.overlayPath, { force: true });
      act(file.overlayPath, 'removed-unused-file', 'scratch file no backup job uses');
    }
    if (actions.length === 0) act(socketPath ?? '', 'already-gone', 'no backup job and no scratch file: nothing to do');
    return actions;
  }

  for (const overlay of entry.overlays) {
    const base = { vmName: entry.vmName, overlayPath: overlay.overlayPath };
    if (now.kind === 'unreachable') {
      actions.push({ ...base, action: 'left-in-place', detail: `libvirt does not answer (${now.why})` });
      continue;
    }
    // The ledger's overlays name no disk (QEMU rows have none): the disk running on the overlay is the one.
    const disk = now.kind === 'running' ? now.disks.find((candidate) => candidate.path === overlay.overlayPath) : undefined;
    if (disk) {
      const jobLeft = disk.mirror !== undefined || (await virsh.blockJob(domainName, disk.target).catch(() => undefined)) !== undefined;
      try {
        if (!options.dryRun) {
          faultPoint('hunt.before-commit');
          await commitLibvirtOverlay(virsh, domainName, { diskName: disk.target, overlayPath: overlay.overlayPath, baseNodeName: overlay.baseNodeName });
          await rm(overlay.overlayPath, { force: true });
        }
        actions.push({ ...base, action: 'committed-live', detail: `blockcommit --active --pivot of ${disk.target} into ${overlay.baseNodeName}${jobLeft ? ' (finished the commit job the task had started)' : ''}` });
      } catch (error) {
        actions.push({ ...base, action: 'left-in-place', detail: `could not commit: ${messageOf(error)}` });
      }
    } else if (!existsSync(overlay.overlayPath)) {
      actions.push({ ...base, action: 'already-gone', detail: 'no overlay file and the domain does not run on it: nothing to do' });
    } else if (now.kind === 'running') {
      const inChain = now.disks.some((candidate) => candidate.backingChain.some((layer) => layer.path === overlay.overlayPath));
      if (inChain) {
        actions.push({ ...base, action: 'left-in-place', detail: 'a disk of the domain has the overlay below its active layer (snapshotted again since): commit it by hand' });
      } else {
        if (!options.dryRun) await rm(overlay.overlayPath, { force: true });
        actions.push({ ...base, action: 'removed-unused-file', detail: 'the domain does not use it' });
      }
    } else if (now.kind === 'stopped') {
      // A persistent domain stopped on its overlay: its definition names the overlay, so an offline commit would
      // leave it pointing at a file that is gone. Started again, the next hunt commits live.
      actions.push({ ...base, action: 'left-in-place', detail: `domain ${domainName} is shut off on its overlay: start it and run "snapshift hunt" again` });
    } else {
      try {
        // The overlay may hold guest writes made after the snapshot: merge them, never just delete.
        if (!options.dryRun) {
          await exec('qemu-img', ['commit', '-q', '-f', 'qcow2', overlay.overlayPath]);
          await rm(overlay.overlayPath, { force: true });
        }
        actions.push({ ...base, action: 'committed-offline', detail: `domain ${domainName} is gone: qemu-img commit into the base image` });
      } catch (error) {
        actions.push({ ...base, action: 'left-in-place', detail: `domain ${domainName} is gone and the offline commit failed: ${messageOf(error)}` });
      }
    }
  }
  return actions;
}

/**
 * A libvirt host's side of the hunt: pull backup jobs whose socket is ours (fleecing, or a changed-block query)
 * of sessions that no longer run are aborted, and our scratch files beside the domains' images that no job
 * uses are removed. Overlays without a ledger row are not touched: their file names carry no session tag.
 */
export async function huntLibvirtHost(virsh: Virsh, options: HuntOptions): Promise<HuntAction[]> {
  const actions: HuntAction[] = [];
  const inUse = new Set<string>();
  const folders = new Set<string>();
  for (const domain of await virsh.listDomains()) {
    if (domain.state === 'shut-off') continue;
    const job = await virsh.backupJob(domain.name).catch(() => undefined);
    for (const disk of (await virsh.disks(domain.name)).filter(isProtectedDisk)) if (disk.type === 'file') folders.add(dirname(disk.path!));
    const socketPath = job?.server?.socketPath;
    const tag = socketPath === undefined ? undefined : tagInName(socketPath);
    if (!job || tag === undefined) continue;
    if (options.isLiveTag(tag)) {
      for (const disk of job.disks) if (disk.scratchPath) inUse.add(disk.scratchPath);
      continue;
    }
    if (!options.dryRun) await virsh.jobAbort(domain.name);
    const purpose = socketPath!.endsWith('-cbt.sock') ? 'changed-block query' : 'fleecing';
    actions.push({ vmName: domain.name, overlayPath: socketPath!, action: purpose === 'fleecing' ? 'removed-fleecing' : 'removed-export', detail: `pull backup job (${purpose}) of session ${tag}, which no longer runs, aborted` });
  }
  for (const folder of folders) {
    for (const name of await readdir(folder).catch(() => [] as string[])) {
      const path = join(folder, name);
      const tag = tagInName(path);
      if (tag === undefined || options.isLiveTag(tag) || inUse.has(path)) continue;
      if (!options.dryRun) await rm(path, { force: true });
      actions.push({ vmName: '', overlayPath: path, action: 'removed-unused-file', detail: `scratch file of session ${tag}, which no longer runs` });
    }
  }
  return actions;
}
