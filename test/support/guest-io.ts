import { NbdClient } from '../../src/datamover/nbd/index.ts';
import { QmpClient } from '../../src/hypervisor/qemu/qmp-client.ts';
import type { StorageDaemon } from '../../src/lab/storage-daemon.ts';

/** Writes `data` at `offset` of a daemon's writable export, as a guest would, and flushes. */
export async function guestWrite(daemon: StorageDaemon, offset: number, data: Buffer, exportName = 'disk0'): Promise<void> {
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName });
  await nbd.write(offset, data);
  await nbd.flush();
}

/** Reads what the guest sees at `offset`. */
export async function guestRead(daemon: StorageDaemon, offset: number, length: number, exportName = 'disk0'): Promise<Buffer> {
  await using nbd = await NbdClient.connect({ socketPath: daemon.nbdSocketPath, exportName });
  return await nbd.read(offset, length); // awaited before the connection is disposed
}

/** Block nodes named by us (overlays) still in the daemon's graph: none once a VM snapshot is committed. */
export async function snapshiftNodesOf(daemon: StorageDaemon): Promise<string[]> {
  await using qmp = await QmpClient.connect(daemon.qmpSocketPath);
  const nodes = await qmp.execute<Array<{ 'node-name': string }>>('query-named-block-nodes', { flat: true });
  return nodes.map((node) => node['node-name']).filter((name) => name.startsWith('snapshift-'));
}
