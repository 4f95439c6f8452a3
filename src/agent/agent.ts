// The device agent: enrol (first operational certificate) and re-enrol (renewal, optionally with a
// new key) over EST, with the server pinned to the Hallmark root. What it stores is public: the
// certificate (cert.pem), its CA chain up to but not including the root (chain.pem) and a summary
// (enrolment.json). Key files are never written; secrets (claim, PIN, passphrase) never stored.
//
// Trust: the pinned root is the only anchor. The TLS server certificate must chain to it (EstClient);
// every CA certificate /cacerts returns must chain to it; the issued certificate must be signed by
// one of those CAs, be currently valid, not be a CA, and carry exactly our public key.

import { randomBytes, X509Certificate } from 'node:crypto';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { encodePem, decodePemBlocks, SIZE_LIMITS } from '../pki/pem.js';
import type { DeviceKey } from './device-key.js';
import { EstClient, EstClientError, type EstClientOptions, type EstIssued } from './est-client.js';

export const STATE_FILES = { cert: 'cert.pem', chain: 'chain.pem', info: 'enrolment.json' } as const;

export interface AgentServerOptions {
  /** https://host:port of the Hallmark server. */
  readonly server: string | URL;
  /** PEM of the pinned root certificate(s): the only trust anchors. */
  readonly trust: string | Buffer;
  /** EST label (product or line name). */
  readonly label?: string;
  readonly timeoutMs?: number;
  readonly minVersion?: EstClientOptions['minVersion'];
  readonly maxVersion?: EstClientOptions['maxVersion'];
}

export interface EnrolOptions extends AgentServerOptions {
  /** The device key the certificate is for. */
  readonly key: DeviceKey;
  /** Where cert.pem, chain.pem and enrolment.json are written (created if missing). */
  readonly stateDir: string;
  /** A Hallmark claim, "id:secret" (HTTP Basic). */
  readonly claim?: string;
  /** A birth certificate (PEM) for `key`, presented as the TLS client certificate. */
  readonly birthCertificate?: string | Buffer;
  /** Intermediates between the birth certificate and its vendor CA (PEM), sent after it. */
  readonly birthChain?: string | Buffer;
  /** Put the TLS channel binding into the CSR (default: when authenticating by registered key alone). */
  readonly channelBinding?: boolean;
}

export interface ReenrolOptions extends AgentServerOptions {
  /** The key of the current certificate (TLS client authentication). */
  readonly key: DeviceKey;
  /** The state directory of the earlier enrolment (cert.pem, chain.pem); updated in place. */
  readonly stateDir: string;
  /** Rekey: the CSR is made with this key instead (the product must allow rekey). */
  readonly newKey?: DeviceKey;
}

export type AgentAuthenticator = 'claim' | 'birth-certificate' | 'registered-key' | 'current-certificate';

export interface EnrolmentInfo {
  readonly udid: string;
  readonly serial: string;
  readonly subject: string;
  readonly issuer: string;
  readonly notBefore: string;
  readonly notAfter: string;
  readonly authenticator: AgentAuthenticator;
  /** The channel binding carried in the CSR, when one was. */
  readonly channelBinding?: 'tls-unique' | 'tls-exporter';
  readonly tlsVersion?: string;
  /** True when re-enrolment changed the key. */
  readonly rekeyed?: boolean;
  /** The issued certificate, DER. */
  readonly certificate: Buffer;
  /** Its CA chain, issuer first, without the root (DER). */
  readonly chain: readonly Buffer[];
  readonly files: { readonly cert: string; readonly chain: string; readonly info: string };
}

/** A CA certificate /cacerts returned that chains to the pinned root, with its path (itself first, root excluded). */
interface VerifiedCa {
  readonly cert: X509Certificate;
  readonly path: readonly X509Certificate[];
}

const fail = (code: string, message: string): EstClientError => new EstClientError(code, message);

function checkValidNow(cert: X509Certificate, what: string, now = Date.now()): void {
  if (Date.parse(cert.validFrom) > now) throw fail('EST_CERT_INVALID', `${what} is not valid before ${cert.validFrom}`);
  if (Date.parse(cert.validTo) <= now) throw fail('EST_CERT_INVALID', `${what} expired at ${cert.validTo}`);
}

/** True when `issuer` issued `cert` (names match and the signature verifies). */
function issuedBy(cert: X509Certificate, issuer: X509Certificate): boolean {
  try {
    return cert.checkIssued(issuer) && cert.verify(issuer.publicKey);
  } catch {
    return false;
  }
}

/**
 * Checks that every certificate /cacerts returned chains to a pinned root (signature by signature,
 * CA certificates only, valid now) and returns them with their paths. A certificate equal to a
 * pinned root is the root itself. Anything that does not chain makes the whole answer untrusted.
 */
export function verifyCaCertificates(roots: readonly X509Certificate[], cacerts: readonly Buffer[], now = Date.now()): VerifiedCa[] {
  const verified: VerifiedCa[] = roots.map((r) => ({ cert: r, path: [] }));
  const pending: X509Certificate[] = [];
  for (const [i, der] of cacerts.entries()) {
    let cert: X509Certificate;
    try {
      cert = new X509Certificate(der);
    } catch (err) {
      throw new EstClientError('EST_CA_UNTRUSTED', `cacerts: certificate ${i} cannot be parsed`, { cause: err });
    }
    if (roots.some((r) => r.raw.equals(cert.raw))) continue;
    pending.push(cert);
  }
  let progress = true;
  while (pending.length > 0 && progress) {
    progress = false;
    for (let i = 0; i < pending.length; i++) {
      const cert = pending[i]!;
      const issuer = verified.find((v) => issuedBy(cert, v.cert));
      if (!issuer) continue;
      if (!cert.ca) throw fail('EST_CA_UNTRUSTED', `cacerts: ${cert.subject.replace(/\n/g, ', ')} is not a CA certificate`);
      checkValidNow(cert, `cacerts: CA certificate ${cert.subject.replace(/\n/g, ', ')}`, now);
      verified.push({ cert, path: [cert, ...issuer.path] });
      pending.splice(i, 1);
      i--;
      progress = true;
    }
  }
  if (pending.length > 0) {
    throw fail('EST_CA_UNTRUSTED', `cacerts: ${pending.map((c) => JSON.stringify(c.subject.replace(/\n/g, ', '))).join(', ')} does not chain to the pinned root — wrong server or wrong --trust`);
  }
  return verified;
}

/**
 * Checks the issued certificate: signed by a verified CA, valid now, not a CA, and for `spki`.
 * Returns the chain (issuer first, root excluded).
 */
export function verifyIssuedCertificate(issued: Buffer, cas: readonly VerifiedCa[], spki: Buffer, now = Date.now()): { cert: X509Certificate; chain: X509Certificate[] } {
  let cert: X509Certificate;
  try {
    cert = new X509Certificate(issued);
  } catch (err) {
    throw new EstClientError('EST_CERT_INVALID', 'the issued certificate cannot be parsed', { cause: err });
  }
  const issuer = cas.find((ca) => issuedBy(cert, ca.cert));
  if (!issuer) throw fail('EST_CERT_INVALID', 'the issued certificate does not chain to the pinned root through the CA certificates the server listed');
  if (cert.ca) throw fail('EST_CERT_INVALID', 'the issued certificate is a CA certificate, not a device certificate');
  checkValidNow(cert, 'the issued certificate', now);
  const got = cert.publicKey.export({ type: 'spki', format: 'der' });
  if (!got.equals(spki)) throw fail('EST_CERT_INVALID', 'the issued certificate does not carry the public key of the CSR');
  return { cert, chain: [...issuer.path] };
}

async function writeAtomic(path: string, data: string | Buffer, mode = 0o644): Promise<void> {
  const tmp = `${path}.tmp-${randomBytes(6).toString('hex')}`;
  try {
    await writeFile(tmp, data, { mode });
    await rename(tmp, path);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
}

async function store(options: { stateDir: string }, result: Omit<EnrolmentInfo, 'files' | 'certificate' | 'chain'> & { cert: X509Certificate; chain: X509Certificate[]; server: string; label?: string; keyUdid: string }): Promise<EnrolmentInfo> {
  await mkdir(options.stateDir, { recursive: true, mode: 0o700 });
  const files = { cert: join(options.stateDir, STATE_FILES.cert), chain: join(options.stateDir, STATE_FILES.chain), info: join(options.stateDir, STATE_FILES.info) };
  const { cert, chain, server, label, keyUdid, ...info } = result;
  // chain.pem first: a reader that finds the new cert.pem finds its chain too.
  await writeAtomic(files.chain, chain.map((c) => encodePem('CERTIFICATE', c.raw)).join(''));
  await writeAtomic(files.cert, encodePem('CERTIFICATE', cert.raw));
  const summary = { ...info, server, ...(label !== undefined ? { label } : {}), keyUdid, fingerprintSha256: cert.fingerprint256.replace(/:/g, '').toLowerCase(), updatedAt: new Date().toISOString() };
  await writeAtomic(files.info, JSON.stringify(summary, null, 2) + '\n');
  return { ...info, certificate: cert.raw, chain: chain.map((c) => c.raw), files };
}

function describe(cert: X509Certificate): Pick<EnrolmentInfo, 'udid' | 'serial' | 'subject' | 'issuer' | 'notBefore' | 'notAfter'> {
  // Hallmark puts the device's UDID (hex) in the subject CN.
  const cn = /^CN=(.*)$/m.exec(cert.subject)?.[1];
  return {
    udid: cn ?? '',
    serial: cert.serialNumber.toLowerCase(),
    subject: cert.subject.replace(/\n/g, ', '),
    issuer: cert.issuer.replace(/\n/g, ', '),
    notBefore: new Date(cert.validFrom).toISOString(),
    notAfter: new Date(cert.validTo).toISOString(),
  };
}

function clientOptions(options: AgentServerOptions): Pick<EstClientOptions, 'server' | 'trust' | 'label' | 'timeoutMs' | 'minVersion' | 'maxVersion'> {
  return { server: options.server, trust: options.trust, label: options.label, timeoutMs: options.timeoutMs, minVersion: options.minVersion, maxVersion: options.maxVersion };
}

/**
 * First enrolment: cacerts (checked against the pinned root) → CSR → simpleenroll → the issued
 * certificate checked → cert.pem + chain.pem written. Authentication: the claim if given, else the
 * birth certificate as TLS client certificate if given, else the registered key alone (the CSR then
 * carries the TLS channel binding in its challengePassword, made on the connection that sends it).
 */
export async function enrol(options: EnrolOptions): Promise<EnrolmentInfo> {
  if (options.claim !== undefined && options.birthCertificate !== undefined) throw fail('EST_BAD_OPTIONS', 'give a claim or a birth certificate, not both');
  const authenticator: AgentAuthenticator = options.claim !== undefined ? 'claim' : options.birthCertificate !== undefined ? 'birth-certificate' : 'registered-key';
  let clientCert: string | undefined;
  if (options.birthCertificate !== undefined) {
    clientCert = pemText(options.birthCertificate, 'birth certificate') + (options.birthChain !== undefined ? pemText(options.birthChain, 'birth certificate chain') : '');
    const leaf = new X509Certificate(decodePemBlocks(clientCert, SIZE_LIMITS.chain)[0]!.der);
    if (!leaf.publicKey.export({ type: 'spki', format: 'der' }).equals(options.key.publicKeySpki)) {
      throw fail('EST_BAD_OPTIONS', 'the birth certificate is not for the device key');
    }
  }
  const client = new EstClient({
    ...clientOptions(options),
    basic: options.claim,
    ...(clientCert !== undefined ? { clientCert, clientKey: options.key.tlsCredentials() } : {}),
  });
  try {
    const cas = verifyCaCertificates(client.trustAnchors, await client.cacerts());
    const bind = options.channelBinding ?? authenticator === 'registered-key';
    let issued: EstIssued;
    let channelBinding: EnrolmentInfo['channelBinding'];
    if (bind) {
      const r = await client.enrollWithBinding((binding) => options.key.createCsr({ challengePassword: binding.value.toString('base64') }));
      issued = r;
      channelBinding = r.channelBinding;
    } else {
      issued = await client.simpleEnroll(await options.key.createCsr());
    }
    const tlsVersion = client.protocol;
    const { cert, chain } = verifyIssuedCertificate(issued.certificate, cas, options.key.publicKeySpki);
    return await store(options, {
      ...describe(cert), authenticator, ...(channelBinding ? { channelBinding } : {}), ...(tlsVersion ? { tlsVersion } : {}),
      cert, chain, server: String(options.server), label: options.label, keyUdid: options.key.udid,
    });
  } finally {
    client.destroy();
  }
}

/** The certificate and chain an earlier enrolment stored. */
export async function readState(stateDir: string): Promise<{ cert: X509Certificate; chainPem: string; certPem: string; label?: string }> {
  let certPem: string;
  try {
    certPem = await readFile(join(stateDir, STATE_FILES.cert), 'utf8');
  } catch (err) {
    throw new EstClientError('EST_BAD_OPTIONS', `no current certificate in ${stateDir} (${(err as NodeJS.ErrnoException).code}): enrol first`);
  }
  const chainPem = await readFile(join(stateDir, STATE_FILES.chain), 'utf8').catch(() => '');
  const blocks = decodePemBlocks(certPem, SIZE_LIMITS.certificate);
  const cert = new X509Certificate(blocks[0]!.der);
  let label: string | undefined;
  try {
    const info = JSON.parse(await readFile(join(stateDir, STATE_FILES.info), 'utf8')) as { label?: unknown };
    if (typeof info.label === 'string') label = info.label;
  } catch {
    // no summary: fine
  }
  return { cert, chainPem, certPem, label };
}

/**
 * Re-enrolment: the current certificate (stateDir/cert.pem + chain.pem) with its key authenticates
 * the TLS connection; the CSR is made with the same key, or with `newKey` (rekey).
 */
export async function reenrol(options: ReenrolOptions): Promise<EnrolmentInfo> {
  const state = await readState(options.stateDir);
  if (!state.cert.publicKey.export({ type: 'spki', format: 'der' }).equals(options.key.publicKeySpki)) {
    throw fail('EST_BAD_OPTIONS', `the current certificate in ${options.stateDir} is not for the key ${options.key.description}`);
  }
  const label = options.label ?? state.label;
  const client = new EstClient({
    ...clientOptions({ ...options, label }),
    clientCert: state.certPem + state.chainPem,
    clientKey: options.key.tlsCredentials(),
  });
  try {
    const cas = verifyCaCertificates(client.trustAnchors, await client.cacerts());
    const csrKey = options.newKey ?? options.key;
    const issued = await client.simpleReenroll(await csrKey.createCsr());
    const tlsVersion = client.protocol;
    const { cert, chain } = verifyIssuedCertificate(issued.certificate, cas, csrKey.publicKeySpki);
    const rekeyed = !csrKey.publicKeySpki.equals(options.key.publicKeySpki);
    return await store(options, {
      ...describe(cert), authenticator: 'current-certificate', ...(tlsVersion ? { tlsVersion } : {}), rekeyed,
      cert, chain, server: String(options.server), label, keyUdid: csrKey.udid,
    });
  } finally {
    client.destroy();
  }
}

/** Alias with the spelling the CLI uses. */
export const reenroll = reenrol;

/** Default renewal point when the product's own window is unknown to the device: two thirds of the lifetime. */
export const DEFAULT_RENEW_AFTER_PERCENT = 66;

/** When the current certificate becomes due for renewal (its notBefore + `percent` % of its lifetime). */
export function renewalDueAt(cert: X509Certificate, percent = DEFAULT_RENEW_AFTER_PERCENT): Date {
  const from = new Date(cert.validFrom).getTime();
  const to = new Date(cert.validTo).getTime();
  return new Date(from + ((to - from) * percent) / 100);
}

export type RenewOutcome = { readonly renewed: true; readonly info: EnrolmentInfo } | { readonly renewed: false; readonly dueAt: Date; readonly reason: string };

/**
 * Renews only inside the renewal window: not before `renewAfterPercent` of the current certificate's
 * lifetime (the device's own guess), and not before the server's window (a RENEWAL_NOT_DUE answer carries
 * Retry-After, which becomes the next due time). What `hallmark agent reenroll --if-due` and a device's
 * renewal loop call.
 */
export async function renewIfDue(options: ReenrolOptions & { readonly renewAfterPercent?: number; readonly now?: Date }): Promise<RenewOutcome> {
  const state = await readState(options.stateDir);
  const now = options.now ?? new Date();
  const dueAt = renewalDueAt(state.cert, options.renewAfterPercent);
  if (now < dueAt) return { renewed: false, dueAt, reason: `not due before ${dueAt.toISOString()} (${options.renewAfterPercent ?? DEFAULT_RENEW_AFTER_PERCENT} % of the lifetime)` };
  try {
    return { renewed: true, info: await reenrol(options) };
  } catch (err) {
    if (err instanceof EstClientError && err.code === 'RENEWAL_NOT_DUE') {
      const wait = err.retryAfterSeconds ?? 3600;
      return { renewed: false, dueAt: new Date(now.getTime() + wait * 1000), reason: `the server's renewal window opens in ${wait} s` };
    }
    throw err;
  }
}

function pemText(input: string | Buffer, what: string): string {
  const text = Buffer.isBuffer(input) ? input.toString('utf8') : input;
  const blocks = decodePemBlocks(text, SIZE_LIMITS.chain);
  if (blocks.some((b) => b.label !== 'CERTIFICATE')) throw fail('EST_BAD_OPTIONS', `the ${what} must be PEM CERTIFICATE blocks`);
  return blocks.map((b) => encodePem('CERTIFICATE', b.der)).join('');
}
