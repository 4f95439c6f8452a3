// The devices of a manifest between the verifying pass and the registry: a million of them must not
// cost a million objects and Buffers (about 1 KB each with their maps). Here a device is its key DER
// and its UDID as bytes, packed into 4 MiB blocks (~100 bytes for a P-256 chip), plus a sparse side
// table for the rarer fields (serial, tenant, birth certificate). The registry reads it by index.

import * as nodeCrypto from 'node:crypto';
import { createHash } from 'node:crypto';
import type { DeviceRegistrationList } from '../registry.js';
import type { ManifestDevice } from './entries.js';

const BLOCK_BYTES = 4 * 1024 * 1024;

type Extras = { -readonly [K in 'serialNumber' | 'tenant' | 'birthCertificate' | 'birthCertificateChain' | 'udid']?: ManifestDevice[K] };

export class CompactDevices implements DeviceRegistrationList {
  readonly #blocks: Buffer[] = [];
  #block: Buffer = Buffer.alloc(0);
  #used = 0;
  /** Per device: block number, offset in the block, key length << 8 | UDID length (bytes). */
  #index = new Uint32Array(3 * 1024);
  #length = 0;
  readonly #extras = new Map<number, Extras>();

  get length(): number { return this.#length; }

  push(device: ManifestDevice): void {
    const spki = device.publicKeySpki;
    const udidBytes = device.udid.length >> 1;
    const size = spki.length + udidBytes;
    if (this.#used + size > this.#block.length) {
      this.#block = Buffer.allocUnsafeSlow(Math.max(BLOCK_BYTES, size));
      this.#blocks.push(this.#block);
      this.#used = 0;
    }
    const offset = this.#used;
    spki.copy(this.#block, offset);
    const extras: Extras = {};
    let hasExtras = false;
    // UDIDs are lowercase hex (checkUdid); anything else is kept as given.
    const written = udidBytes > 0 && udidBytes < 256 ? this.#block.write(device.udid, offset + spki.length, udidBytes, 'hex') : 0;
    const udidLength = written === udidBytes && udidBytes * 2 === device.udid.length && this.#block.toString('hex', offset + spki.length, offset + size) === device.udid ? udidBytes : 0;
    if (udidLength === 0) { extras.udid = device.udid; hasExtras = true; }
    this.#used += spki.length + udidLength;
    if (device.serialNumber !== undefined) { extras.serialNumber = device.serialNumber; hasExtras = true; }
    if (device.tenant !== undefined) { extras.tenant = device.tenant; hasExtras = true; }
    if (device.birthCertificate !== undefined) { extras.birthCertificate = device.birthCertificate; hasExtras = true; }
    if (device.birthCertificateChain !== undefined) { extras.birthCertificateChain = device.birthCertificateChain; hasExtras = true; }
    if (hasExtras) this.#extras.set(this.#length, extras);
    if (3 * (this.#length + 1) > this.#index.length) {
      const grown = new Uint32Array(this.#index.length * 2);
      grown.set(this.#index);
      this.#index = grown;
    }
    const at = 3 * this.#length++;
    this.#index[at] = this.#blocks.length - 1;
    this.#index[at + 1] = offset;
    this.#index[at + 2] = (spki.length << 8) | udidLength;
  }

  at(i: number): ManifestDevice | undefined {
    if (!Number.isInteger(i) || i < 0 || i >= this.#length) return undefined;
    const block = this.#blocks[this.#index[3 * i]!]!;
    const offset = this.#index[3 * i + 1]!;
    const lengths = this.#index[3 * i + 2]!;
    const spkiEnd = offset + (lengths >>> 8);
    const extras = this.#extras.get(i);
    const udid = extras?.udid ?? block.toString('hex', spkiEnd, spkiEnd + (lengths & 0xff));
    return { ...extras, publicKeySpki: block.subarray(offset, spkiEnd), udid };
  }
}

// crypto.hash (Node >= 20.12): a one-shot digest without a Hash object.
const oneShot = (nodeCrypto as { hash?: (algorithm: string, data: Buffer, encoding: 'binary') => string }).hash;

/** SHA-256 of a key as a 32-character string: a compact map key for finding a key twice in one file. */
export const keyDigest: (spki: Buffer) => string = typeof oneShot === 'function'
  ? (spki) => oneShot('sha256', spki, 'binary')
  : (spki) => createHash('sha256').update(spki).digest('binary');
