import { SnapshiftError } from '../../core/errors.ts';
import {
  chunkType,
  command,
  errorNames,
  isErrorChunk,
  replyFlagDone,
  simpleReplyHeaderBytes,
  simpleReplyMagic,
  structuredReplyHeaderBytes,
  structuredReplyMagic,
} from './nbd-protocol.ts';

/** One extent of a meta context, in absolute disk offsets. */
export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

/** A request on the wire, waiting for its reply chunks. */
export interface InFlightRequest {
  cookie: number;
  command: number;
  offsetBytes: number;
  lengthBytes: number;
  /** READ: where the data lands (exactly `lengthBytes` long). */
  target?: Buffer;
  /** READ: bytes of data or holes received, to check the server covered the whole range. */
  coveredBytes: number;
  /** BLOCK_STATUS: the context whose extents we keep, and those extents. */
  contextId?: number;
  extents?: Extent[];
  /** The first error chunk; the request still waits for its final chunk. */
  error?: SnapshiftError;
  settle(error?: SnapshiftError): void;
}

const enum State {
  Header,
  OffsetPrefix,
  Data,
  Payload,
}

/** Largest non-data chunk we accept (block status for a huge range); bigger means a confused stream. */
const maxPayloadChunkBytes = 64 * 1024 * 1024;

/**
 * The one reader of a transmission-phase stream: turns bytes into simple and structured replies
 * (NBD spec: "Transmission", "Structured reply chunk message types") and settles requests by cookie.
 * Data reaches the request's target either by one copy from the fed buffer or, for large payloads, by
 * the socket reading into the target directly (`directReadTarget`). Nothing of a fed buffer is kept
 * after `feed` returns, so the caller may reuse it.
 */
export class NbdReplyParser {
  readonly #lookup: (cookie: number) => InFlightRequest | undefined;
  readonly #finish: (request: InFlightRequest) => void;
  readonly #header = Buffer.alloc(structuredReplyHeaderBytes);
  #headerFill = 0;
  #headerNeed = simpleReplyHeaderBytes;
  #state = State.Header;
  #request: InFlightRequest | undefined;
  #chunkFlags = 0;
  #chunkType = 0;
  #chunkLength = 0;
  readonly #prefix = Buffer.alloc(8);
  #prefixFill = 0;
  #dataTarget: Buffer | undefined;
  #dataPos = 0;
  #dataLeft = 0;
  #finishAfterData = false;
  #payload: Buffer = Buffer.alloc(0);
  #payloadFill = 0;

  constructor(lookup: (cookie: number) => InFlightRequest | undefined, finish: (request: InFlightRequest) => void) {
    this.#lookup = lookup;
    this.#finish = finish;
  }

  /** Consumes `bytes`; throws NBD_PROTOCOL_ERROR when the stream cannot be trusted any more. */
  feed(bytes: Buffer): void {
    let pos = 0;
    const end = bytes.length;
    while (pos < end) {
      switch (this.#state) {
        case State.Data: {
          const n = Math.min(this.#dataLeft, end - pos);
          bytes.copy(this.#dataTarget!, this.#dataPos, pos, pos + n);
          pos += n;
          this.#dataPos += n;
          this.#dataLeft -= n;
          if (this.#dataLeft === 0) this.#endData();
          break;
        }
        case State.Header: {
          const n = Math.min(this.#headerNeed - this.#headerFill, end - pos);
          bytes.copy(this.#header, this.#headerFill, pos, pos + n);
          pos += n;
          this.#headerFill += n;
          if (this.#headerFill === this.#headerNeed) this.#onHeader();
          break;
        }
        case State.OffsetPrefix: {
          const n = Math.min(8 - this.#prefixFill, end - pos);
          bytes.copy(this.#prefix, this.#prefixFill, pos, pos + n);
          pos += n;
          this.#prefixFill += n;
          if (this.#prefixFill === 8) this.#onOffsetPrefix();
          break;
        }
        case State.Payload: {
          const need = this.#chunkLength - this.#payloadFill;
          if (this.#payloadFill === 0 && end - pos >= need) {
            // The whole payload is here: parse it in place, no copy.
            this.#onPayload(bytes.subarray(pos, pos + need));
            pos += need;
            break;
          }
          if (this.#payloadFill === 0) this.#payload = Buffer.allocUnsafe(this.#chunkLength);
          const n = Math.min(need, end - pos);
          bytes.copy(this.#payload, this.#payloadFill, pos, pos + n);
          pos += n;
          this.#payloadFill += n;
          if (this.#payloadFill === this.#chunkLength) this.#onPayload(this.#payload);
          break;
        }
      }
    }
  }

  /**
   * Inside a large data payload: the view of the request's target where the next bytes belong, so the
   * socket can read straight into it (one copy fewer). Undefined elsewhere.
   */
  directReadTarget(minBytes: number): Buffer | undefined {
    if (this.#state !== State.Data || this.#dataLeft < minBytes) return undefined;
    return this.#dataTarget!.subarray(this.#dataPos, this.#dataPos + this.#dataLeft);
  }

  /** Accounts for `length` bytes the socket wrote into the view `directReadTarget` returned. */
  advanceDirect(length: number): void {
    this.#dataPos += length;
    this.#dataLeft -= length;
    if (this.#dataLeft === 0) this.#endData();
  }

  #onHeader(): void {
    const magic = this.#header.readUInt32BE(0);
    if (magic === structuredReplyMagic && this.#headerNeed === simpleReplyHeaderBytes) {
      this.#headerNeed = structuredReplyHeaderBytes;
      return;
    }
    if (magic !== simpleReplyMagic && magic !== structuredReplyMagic) throw protocolError(`bad reply magic 0x${magic.toString(16)}`);
    const request = this.#requestFor(this.#header);
    this.#request = request;
    this.#headerFill = 0;
    this.#headerNeed = simpleReplyHeaderBytes;
    if (magic === simpleReplyMagic) return this.#onSimpleReply(request, this.#header.readUInt32BE(4));

    this.#chunkFlags = this.#header.readUInt16BE(4);
    this.#chunkType = this.#header.readUInt16BE(6);
    this.#chunkLength = this.#header.readUInt32BE(16);
    if (this.#chunkType === chunkType.offsetData) {
      if (request.command !== command.read || this.#chunkLength < 8) throw protocolError(`OFFSET_DATA chunk for a ${request.command} request`);
      this.#prefixFill = 0;
      this.#state = State.OffsetPrefix;
      return;
    }
    if (this.#chunkLength > maxPayloadChunkBytes) throw protocolError(`reply chunk of ${this.#chunkLength} bytes`);
    if (this.#chunkLength === 0) return this.#onPayload(Buffer.alloc(0));
    this.#payloadFill = 0;
    this.#state = State.Payload;
  }

  #onSimpleReply(request: InFlightRequest, errorValue: number): void {
    if (errorValue !== 0) {
      this.#finishRequest(request, commandError(request, errorValue, ''));
      return;
    }
    if (request.command === command.read) {
      // A simple read reply is followed by exactly the requested bytes.
      this.#startData(request.target!, 0, request.lengthBytes, true);
      request.coveredBytes = request.lengthBytes;
      return;
    }
    this.#finishRequest(request);
  }

  #onOffsetPrefix(): void {
    const request = this.#request!;
    const dataOffset = Number(this.#prefix.readBigUInt64BE(0));
    const dataLength = this.#chunkLength - 8;
    const at = dataOffset - request.offsetBytes;
    if (at < 0 || at + dataLength > request.lengthBytes) throw protocolError(`OFFSET_DATA ${dataOffset}+${dataLength} outside the read ${request.offsetBytes}+${request.lengthBytes}`);
    request.coveredBytes += dataLength;
    this.#startData(request.target!, at, dataLength, (this.#chunkFlags & replyFlagDone) !== 0);
  }

  #startData(target: Buffer, at: number, length: number, finishAfter: boolean): void {
    this.#dataTarget = target;
    this.#dataPos = at;
    this.#dataLeft = length;
    this.#finishAfterData = finishAfter;
    this.#state = State.Data;
    if (length === 0) this.#endData();
  }

  #endData(): void {
    this.#state = State.Header;
    this.#dataTarget = undefined;
    if (this.#finishAfterData) this.#finishRequest(this.#request!);
  }

  #onPayload(payload: Buffer): void {
    this.#state = State.Header;
    const request = this.#request!;
    const type = this.#chunkType;
    if (type === chunkType.offsetHole) {
      if (payload.length !== 12 || request.command !== command.read) throw protocolError('malformed OFFSET_HOLE chunk');
      const at = Number(payload.readBigUInt64BE(0)) - request.offsetBytes;
      const holeLength = payload.readUInt32BE(8);
      if (at < 0 || at + holeLength > request.lengthBytes) throw protocolError('OFFSET_HOLE outside the read');
      request.target!.fill(0, at, at + holeLength);
      request.coveredBytes += holeLength;
    } else if (type === chunkType.blockStatus) {
      if (payload.length < 12 || (payload.length - 4) % 8 !== 0) throw protocolError('malformed BLOCK_STATUS chunk');
      if (payload.readUInt32BE(0) === request.contextId) {
        const extents = (request.extents ??= []);
        let offset = request.offsetBytes;
        for (let at = 4; at < payload.length; at += 8) {
          const length = payload.readUInt32BE(at);
          extents.push({ offset, length, flags: payload.readUInt32BE(at + 4) });
          offset += length;
        }
      }
    } else if (isErrorChunk(type)) {
      if (payload.length < 6) throw protocolError('malformed error chunk');
      const messageLength = payload.readUInt16BE(4);
      const message = payload.toString('utf8', 6, Math.min(payload.length, 6 + messageLength));
      const where = type === chunkType.errorOffset && payload.length >= 6 + messageLength + 8 ? ` at offset ${payload.readBigUInt64BE(6 + messageLength)}` : '';
      request.error ??= commandError(request, payload.readUInt32BE(0), message + where);
    } else if (type !== chunkType.none) {
      throw protocolError(`unknown reply chunk type ${type}`);
    }
    if ((this.#chunkFlags & replyFlagDone) !== 0) this.#finishRequest(request);
  }

  #requestFor(header: Buffer): InFlightRequest {
    // Both reply kinds carry the 64-bit cookie at byte 8; ours fit in the low 32 bits.
    const request = header.readUInt32BE(8) === 0 ? this.#lookup(header.readUInt32BE(12)) : undefined;
    if (!request) throw protocolError(`reply for unknown cookie ${header.readBigUInt64BE(8)}`);
    return request;
  }

  #finishRequest(request: InFlightRequest, error?: SnapshiftError): void {
    if (error) request.error ??= error;
    if (!request.error && request.command === command.read && request.coveredBytes !== request.lengthBytes) {
      request.error = protocolError(`read ${request.offsetBytes}+${request.lengthBytes} answered with ${request.coveredBytes} bytes`);
    }
    this.#finish(request);
  }
}

const commandNames: Record<number, string> = { 0: 'READ', 1: 'WRITE', 3: 'FLUSH', 4: 'TRIM', 5: 'CACHE', 6: 'WRITE_ZEROES', 7: 'BLOCK_STATUS' };

function commandError(request: InFlightRequest, errorValue: number, message: string): SnapshiftError {
  const name = errorNames[errorValue] ?? `error ${errorValue}`;
  return new SnapshiftError(
    'NBD_COMMAND_FAILED',
    `NBD ${commandNames[request.command] ?? request.command} ${request.offsetBytes}+${request.lengthBytes} failed: ${name}${message ? ` (${message})` : ''}`,
  );
}

function protocolError(what: string): SnapshiftError {
  return new SnapshiftError('NBD_PROTOCOL_ERROR', `NBD server broke the protocol: ${what}`);
}
