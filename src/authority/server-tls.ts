// The authority's own HTTPS certificate (EST, admin API, OCSP over TLS): `<home>/tls/server.pem`, issued
// by the default issuing CA at init with the `tls-server` profile (397 days at most). Without renewal
// every device's EST call would fail on the day it expires, so it is renewed like the OCSP signers:
// `hallmark tls renew` by hand, and `hallmark serve` by itself when fewer than TLS_RENEW_WITHIN_DAYS
// are left (src/server/servers.ts reloads the listener's TLS context in place; open connections keep
// the old one until they close).
//
// A renewal makes a new key (file backend, like init's), issues the certificate, writes the chain file
// (atomically: temporary file, rename) and then points the configuration at the new key. A crash between
// the two leaves a chain whose key is not the configured one: serverTls() says so and names the fix.

import { X509Certificate } from 'node:crypto';
import { mkdir, open, readFile, rename, stat, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { HallmarkError } from '../errors.js';
import { decodePemBlocks, encodePem } from '../pki/pem.js';
import type { Authority } from './authority.js';
import { HOME_FILES, saveHomeConfig } from './home.js';

/** `serve` renews the certificate when fewer days than this are left. */
export const TLS_RENEW_WITHIN_DAYS = 30;
const DAY_MS = 86_400_000;
const MAX_CHAIN_BYTES = 64 * 1024;

export interface ServerTls {
  /** PEM: the server certificate, then its issuing CA chain (root excluded). */
  readonly chainPem: string;
  /** PEM PKCS#8 of the private key (kept in memory by the caller). */
  readonly keyPem: string;
  readonly serial: string;
  readonly notAfter: Date;
  readonly dnsNames: readonly string[];
  readonly ipAddresses: readonly string[];
  readonly issuer: string;
}

/** The DNS names and IP addresses in a certificate's subjectAltName. */
export function subjectAltNames(cert: X509Certificate): { dns: string[]; ip: string[] } {
  const san = cert.subjectAltName ?? '';
  return { dns: [...san.matchAll(/DNS:([^,\s]+)/g)].map((m) => m[1]!), ip: [...san.matchAll(/IP Address:([^,\s]+)/g)].map((m) => m[1]!) };
}

/** Days left before `notAfter` (negative once expired). */
export function daysLeft(notAfter: Date, now = new Date()): number {
  return (notAfter.getTime() - now.getTime()) / DAY_MS;
}

export function needsTlsRenewal(notAfter: Date, now = new Date(), withinDays = TLS_RENEW_WITHIN_DAYS): boolean {
  return daysLeft(notAfter, now) < withinDays;
}

/** The current certificate chain and its key, checked against each other. */
export async function serverTls(authority: Authority): Promise<ServerTls> {
  const path = join(authority.home, HOME_FILES.tlsChain);
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new HallmarkError('NOT_INITIALISED', `no TLS certificate at ${path} (hallmark tls renew makes one)`, { cause: err });
  }
  const blocks = decodePemBlocks(text, MAX_CHAIN_BYTES).filter((b) => b.label === 'CERTIFICATE');
  if (blocks.length === 0) throw new HallmarkError('BAD_PEM', `${path} holds no certificate`);
  const leaf = new X509Certificate(blocks[0]!.der);
  const key = await authority.fileKeys.privateKeyObject(authority.config.tls.keyRef);
  if (!leaf.checkPrivateKey(key)) {
    throw new HallmarkError('CA_CERT_MISMATCH', `the TLS certificate in ${path} is not for the configured TLS key (a renewal was interrupted?): run hallmark tls renew`);
  }
  const names = subjectAltNames(leaf);
  return {
    chainPem: text,
    keyPem: key.export({ format: 'pem', type: 'pkcs8' }) as string,
    serial: leaf.serialNumber.toLowerCase(),
    notAfter: new Date(leaf.validTo),
    dnsNames: names.dns,
    ipAddresses: names.ip,
    issuer: leaf.issuer.replace(/\n/g, ', '),
  };
}

export interface RenewTlsOptions {
  /** Replace the DNS names (default: keep the configured ones). */
  readonly dnsNames?: readonly string[];
  /** Replace the IP addresses (default: keep the configured ones). */
  readonly ipAddresses?: readonly string[];
  /** Issuing CA (default: the authority's default issuer). */
  readonly ca?: string;
  readonly actor: string;
}

/**
 * During a root rollover (more than one active root), the link certificates (NewWithOld, OldWithNew):
 * sent after the chain, they let a device that still pins the old root verify a server certificate
 * issued under the new one (and the reverse), as RFC 4210 §4.4 intends them to.
 */
export async function rolloverLinks(authority: Authority): Promise<Buffer[]> {
  return (await authority.directory.rootCertificates()).filter((der) => {
    const c = new X509Certificate(der);
    return c.subject !== c.issuer;
  });
}

/** A lock older than this is left from a process that died while renewing: it is taken over. */
const STALE_LOCK_MS = 5 * 60_000;

/**
 * Runs `fn` holding `<home>/tls/renew.lock` (created exclusively): two processes serving one home (or the
 * CLI beside a server) must not renew at once, or the chain file of one could end up beside the key
 * reference of the other. TLS_RENEWAL_IN_PROGRESS when another process holds it.
 */
async function withRenewalLock<T>(home: string, fn: () => Promise<T>): Promise<T> {
  const lock = join(home, 'tls', 'renew.lock');
  await mkdir(join(home, 'tls'), { recursive: true });
  let handle: FileHandle | undefined;
  for (let attempt = 0; !handle; attempt++) {
    try {
      handle = await open(lock, 'wx', 0o600);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const age = Date.now() - (await stat(lock).then((st) => st.mtimeMs, () => Date.now()));
      if (attempt > 0 || age < STALE_LOCK_MS) throw new HallmarkError('TLS_RENEWAL_IN_PROGRESS', `another process is renewing the TLS certificate (${lock}, ${Math.round(age / 1000)} s old)`);
      await unlink(lock).catch(() => {});
    }
  }
  try {
    await handle.writeFile(`${process.pid}\n`);
    return await fn();
  } finally {
    await handle.close();
    await unlink(lock).catch(() => {});
  }
}

/** Issues a new TLS server certificate with a new key and installs it in the home. */
export async function renewServerTls(authority: Authority, options: RenewTlsOptions): Promise<ServerTls> {
  return withRenewalLock(authority.home, () => renew(authority, options));
}

async function renew(authority: Authority, options: RenewTlsOptions): Promise<ServerTls> {
  const dnsNames = [...new Set(options.dnsNames ?? authority.config.tls.dnsNames)];
  const ipAddresses = [...new Set(options.ipAddresses ?? authority.config.tls.ipAddresses)];
  if (dnsNames.length === 0) throw new HallmarkError('BAD_REQUEST', 'the TLS certificate needs at least one DNS name (--dns)');
  const keyRef = await authority.fileKeys.generateKey('hallmark-tls-server', 'ecdsa-p256');
  const issued = await authority.issueForOwnKey({
    signer: await authority.fileKeys.signer(keyRef), profile: 'tls-server', subject: `CN=${dnsNames[0]},O=${authority.config.org}`,
    altNames: { dns: dnsNames, ip: ipAddresses }, ca: options.ca, actor: options.actor,
  });
  const path = join(authority.home, HOME_FILES.tlsChain);
  const tmp = `${path}.tmp-${process.pid}`;
  const chain = [issued.der, ...issued.chain.slice(0, -1), ...(await rolloverLinks(authority))];
  await writeFile(tmp, chain.map((d) => encodePem('CERTIFICATE', d)).join(''), { mode: 0o644 });
  await rename(tmp, path);
  authority.config.tls = { keyRef, dnsNames, ipAddresses };
  await saveHomeConfig(authority.home, authority.config);
  await authority.audit([{ actor: options.actor, action: 'tls.renew', target: issued.serial, details: { issuer: issued.issuer, notAfter: issued.notAfter.toISOString(), dnsNames, ipAddresses } }]);
  return serverTls(authority);
}
