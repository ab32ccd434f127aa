import { existsSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import type { VmSnapshotLedgerEntry } from '../../catalog/catalog.ts';
import { exec } from '../../core/exec.ts';
import { messageOf } from '../../core/errors.ts';
import { faultPoint } from '../../core/fault-points.ts';
import type { HuntAction, HuntOptions } from '../hypervisor.ts';
import { commitOverlay } from './block-commit.ts';
import { backingChildOf, blockNodeNames, queryNamedBlockNodes } from './block-graph.ts';
import { bitmapOwnerOf, listDirtyBitmaps, revertBitmapRotation } from './dirty-bitmaps.ts';
import { fleecingDetailsOf, removeLeftoverFleecing, repairFleecingLedgerRow } from './fleecing-hunter.ts';
import { removeLeftoverExports } from './qemu-nbd-export.ts';
import type { QmpClient } from './qmp-client.ts';
import { connectQmp } from './qmp-connect.ts';

/**
 * Undoes the VM snapshot of one ledger row whose task is gone: an overlay still active in a running QEMU is
 * committed live; one whose QEMU is gone is committed offline with qemu-img (which refuses if anyone still
 * holds the image); a file no chain uses is deleted. Exports of sessions no longer running go too.
 */
export async function repairQemuLedgerEntry(entry: VmSnapshotLedgerEntry, options: HuntOptions): Promise<HuntAction[]> {
  const actions: HuntAction[] = [];
  let qmp: QmpClient | undefined;
  try {
    qmp = await connectQmp(entry.vmName, entry.qmpSocketPath, 5_000);
  } catch {
    qmp = undefined; // QEMU is gone (or not answering): only offline repair is possible
  }
  try {
    if (qmp && !options.dryRun) await removeLeftoverExports(qmp, options.isLiveTag);
    // A fleecing row's "overlays" are scratch images: never committed (that would write old data into the disk).
    if (entry.adapter?.['fleecing'] === true) {
      actions.push(...(await repairFleecingEntry(entry, qmp, options)));
      if (qmp && actions.every((action) => action.action !== 'left-in-place')) actions.push(...(await revertDeadSessionBitmaps(qmp, entry, options)));
      return actions;
    }
    const liveNodes = qmp ? await blockNodeNames(qmp) : undefined;
    for (const overlay of entry.overlays) {
      const base = { vmName: entry.vmName, overlayPath: overlay.overlayPath };
      if (liveNodes?.has(overlay.overlayNodeName)) {
        if (!options.dryRun) {
          faultPoint('hunt.before-commit');
          await commitOverlay(qmp!, overlay);
        }
        actions.push({ ...base, action: 'committed-live', detail: `block-commit of ${overlay.overlayNodeName} into ${overlay.baseNodeName}` });
      } else if (!existsSync(overlay.overlayPath)) {
        actions.push({ ...base, action: 'already-gone', detail: 'no overlay file and no node: nothing to do' });
      } else if (liveNodes) {
        // QEMU runs but does not use the file: the snapshot never became active (or was committed already).
        if (!options.dryRun) await rm(overlay.overlayPath, { force: true });
        actions.push({ ...base, action: 'removed-unused-file', detail: 'QEMU does not use it' });
      } else {
        try {
          // The overlay may hold guest writes made after the snapshot: merge them, never just delete.
          if (!options.dryRun) {
            await exec('qemu-img', ['commit', '-q', '-f', 'qcow2', overlay.overlayPath]);
            await rm(overlay.overlayPath, { force: true });
          }
          actions.push({ ...base, action: 'committed-offline', detail: 'QEMU is not running: qemu-img commit into the base image' });
        } catch (error) {
          actions.push({ ...base, action: 'left-in-place', detail: `cannot reach QEMU and cannot commit offline: ${messageOf(error)}` });
        }
      }
    }
    if (qmp && actions.every((action) => action.action !== 'left-in-place')) actions.push(...(await revertDeadSessionBitmaps(qmp, entry, options)));
  } finally {
    await qmp?.close();
  }
  return actions;
}

/**
 * The dirty-bitmap rotation a killed task made at its VM snapshot (or fleecing start), undone as its own
 * `finish(false)` would have: the session's new bitmap is merged back into the chain's frozen one, which records
 * again, so the next backup is still incremental and misses no write. A ledger row means the task's restore
 * point was never committed (its point in time is released before the commit), so the session's bitmap is in
 * no restore point. Left alone, the next backup would find the chain's bitmap stopped and read every disk in full.
 */
async function revertDeadSessionBitmaps(qmp: QmpClient, entry: VmSnapshotLedgerEntry, options: HuntOptions): Promise<HuntAction[]> {
  const tag = entry.sessionId.slice(0, 8);
  if (options.isLiveTag(tag)) return [];
  const actions: HuntAction[] = [];
  for (const node of await queryNamedBlockNodes(qmp)) {
    const nodeName = node['node-name'];
    const bitmaps = await listDirtyBitmaps(qmp, nodeName);
    for (const started of bitmaps.filter((bitmap) => bitmap.name.endsWith(`-${tag}`) && bitmapOwnerOf(bitmap.name).kind === 'chain' && !bitmap.busy)) {
      const owner = bitmapOwnerOf(started.name);
      const frozen = bitmaps.find((bitmap) => bitmap !== started && !bitmap.recording && !bitmap.busy && !bitmap.inconsistent && owner.kind === 'chain' && bitmapOwnerOf(bitmap.name).kind === 'chain' && bitmap.name.startsWith(`snapshift-${owner.chainKey}-`));
      try {
        if (!options.dryRun) await revertBitmapRotation(qmp, { nodeName, freeze: frozen?.name, start: { name: started.name, persistent: true } });
        actions.push({ vmName: entry.vmName, overlayPath: `${nodeName}:${started.name}`, action: 'removed-checkpoint', detail: frozen ? `dirty bitmap ${started.name} of the killed task merged back into ${frozen.name}, which records again` : `dirty bitmap ${started.name} of the killed task removed (no earlier bitmap of its chain)` });
      } catch (error) {
        actions.push({ vmName: entry.vmName, overlayPath: `${nodeName}:${started.name}`, action: 'left-in-place', detail: `dirty bitmap ${started.name} could not be merged back: ${messageOf(error)}` });
      }
    }
  }
  return actions;
}

/** The fleecing half of `repairQemuLedgerEntry`: never throws, a failure leaves the row (left-in-place). */
async function repairFleecingEntry(entry: VmSnapshotLedgerEntry, qmp: QmpClient | undefined, options: HuntOptions): Promise<HuntAction[]> {
  // At least one action, or the caller would take the row for done and clear it.
  const leftInPlace = (detail: string): HuntAction[] =>
    (entry.overlays.length > 0 ? entry.overlays.map((overlay) => overlay.overlayPath) : ['']).map((overlayPath) => ({ vmName: entry.vmName, overlayPath, action: 'left-in-place' as const, detail }));
  const details = fleecingDetailsOf(entry.adapter);
  if (!details) return leftInPlace('the ledger row says fleecing but its details are malformed: remove its scratch images and this row by hand');
  if (options.isLiveTag(details.tag)) return leftInPlace(`fleecing ${details.tag} belongs to a session that still runs`);
  try {
    const repairs = await repairFleecingLedgerRow(qmp, details, { dryRun: options.dryRun });
    return repairs.map((repair) => ({ vmName: entry.vmName, overlayPath: repair.scratchPath, action: repair.action, detail: repair.detail }));
  } catch (error) {
    return leftInPlace(`could not remove fleecing ${details.tag}: ${messageOf(error)}`);
  }
}

/**
 * A QEMU host's side of the hunt: exports and overlay nodes named by us (`snapshift-<tag>-…`) of sessions that
 * no longer run (e.g. their ledger row was lost) are removed or committed. A host that does not answer quickly
 * (busy with another client) is skipped, never waited for.
 */
export async function huntQemuHost(vmName: string, qmpSocketPath: string, options: HuntOptions): Promise<HuntAction[]> {
  let qmp: QmpClient;
  try {
    qmp = await connectQmp(vmName, qmpSocketPath, 3_000);
  } catch {
    return [];
  }
  const actions: HuntAction[] = [];
  try {
    // Fleecing a killed task left (first, so its exports are reported with it): the guest's writes still pass
    // its copy-before-write filter into a scratch image nobody reads, which grows until it is removed.
    try {
      for (const leftover of await removeLeftoverFleecing(qmp, options.isLiveTag, { dryRun: options.dryRun })) {
        const removed = [...leftover.exports.map((id) => `export ${id}`), ...leftover.jobs.map((id) => `job ${id}`), ...leftover.nodes.map((name) => `node ${name}`), ...leftover.scratchPaths.map((path) => `scratch image ${path}`)];
        actions.push({ vmName, overlayPath: leftover.scratchPaths[0] ?? '', action: 'removed-fleecing', detail: `fleecing ${leftover.tag} of a session that is no longer running: ${removed.join(', ')}` });
      }
    } catch (error) {
      actions.push({ vmName, overlayPath: '', action: 'left-in-place', detail: `could not remove leftover fleecing: ${messageOf(error)}` });
    }
    // Exports a killed task left (e.g. a changed-block export opened before any snapshot was taken).
    const exports = options.dryRun ? [] : await removeLeftoverExports(qmp, options.isLiveTag).catch(() => []);
    for (const id of exports) actions.push({ vmName, overlayPath: '', action: 'removed-export', detail: `NBD export ${id} of a session that is no longer running` });
    for (const node of await queryNamedBlockNodes(qmp).catch(() => [])) {
      const tag = node['node-name'].match(/^snapshift-([0-9a-f]{8})-\d+$/)?.[1];
      if (!tag || options.isLiveTag(tag)) continue;
      const base = await backingChildOf(qmp, node['node-name']);
      if (!base) continue;
      const overlay = { baseNodeName: base, overlayNodeName: node['node-name'], overlayPath: node.file };
      try {
        if (!options.dryRun) {
          faultPoint('hunt.before-commit');
          await commitOverlay(qmp, overlay);
        }
        actions.push({ vmName, overlayPath: node.file, action: 'committed-live', detail: `overlay ${node['node-name']} of a session that is no longer running` });
      } catch (error) {
        actions.push({ vmName, overlayPath: node.file, action: 'left-in-place', detail: `could not commit: ${messageOf(error)}` });
      }
    }
  } finally {
    await qmp.close();
  }
  return actions;
}
