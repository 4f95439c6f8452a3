// Delegated OCSP signers (RFC 6960 §4.2.2.2): one per issuing CA, a certificate with id-kp-OCSPSigning
// and id-pkix-ocsp-nocheck issued by that CA, whose key lives in the CA key backend (file or PKCS#11).
//
// init makes one for the first issuing CA only; CAs made later (production lines: createSubordinateCa,
// installCa) get theirs here, on first use. A signer within RENEW_WITHIN_DAYS of expiry is replaced by
// a new key and certificate (unless its CA itself ends first: a new one could not outlive it).
// The configuration (hallmark.json ocspSigners) keeps the key reference and the certificate's serial;
// the certificate itself is read from the store.

import { HallmarkError } from '../errors.js';
import type { Signer } from '../keys/key-backend.js';
import { parseKeyAlgorithm } from '../pki/algorithms.js';
import { parseCertificate, type ParsedCertificate } from '../pki/certificate.js';
import { EKU, EXT, decodeOidSequence } from '../pki/extensions.js';
import type { Authority } from './authority.js';
import { saveHomeConfig } from './home.js';

/** A signer is renewed when it has fewer days than this left. */
export const RENEW_WITHIN_DAYS = 30;
const DAY_MS = 86_400_000;

export interface OcspSigner {
  readonly ca: string;
  readonly signer: Signer;
  /** The signer's certificate (DER), issued by `ca`. */
  readonly certificate: Buffer;
  readonly parsed: ParsedCertificate;
  readonly serial: string;
  readonly notAfter: Date;
  /** True when this call created it (a new CA, or a renewal). */
  readonly created: boolean;
}

export interface OcspSignerOptions {
  /** Recorded in the audit log when a signer is created. */
  readonly actor?: string;
  readonly now?: Date;
  readonly renewWithinDays?: number;
}

// One creation at a time per CA in a process: two first requests for a new CA must not make two signers.
const pending = new WeakMap<Authority, Map<string, Promise<OcspSigner>>>();

/** The delegated OCSP signer of issuing CA `ca`: found in the configuration, or created (or renewed) now. */
export function ocspSignerFor(authority: Authority, ca: string, options: OcspSignerOptions = {}): Promise<OcspSigner> {
  let perCa = pending.get(authority);
  if (!perCa) pending.set(authority, (perCa = new Map()));
  const inFlight = perCa.get(ca);
  if (inFlight) return inFlight;
  const p = findOrCreate(authority, ca, options).finally(() => perCa!.delete(ca));
  perCa.set(ca, p);
  return p;
}

/** Whether a signer whose certificate ends at `notAfter` should be replaced, given its CA ends at `caNotAfter`. */
export function needsRenewal(notAfter: Date, caNotAfter: Date | null, now: Date, renewWithinDays = RENEW_WITHIN_DAYS): boolean {
  if (notAfter.getTime() <= now.getTime()) return true;
  if (notAfter.getTime() - now.getTime() >= renewWithinDays * DAY_MS) return false;
  // Near its end: worth replacing only if a new certificate would last longer (it is capped at the CA's end).
  return caNotAfter === null || caNotAfter.getTime() > notAfter.getTime() + DAY_MS;
}

async function findOrCreate(authority: Authority, ca: string, options: OcspSignerOptions): Promise<OcspSigner> {
  const now = options.now ?? new Date();
  const caRow = await authority.directory.caRow(ca);
  if (caRow.role === 'root') throw new HallmarkError('CA_NOT_ACTIVE', `CA ${ca} is the offline root: it has no online OCSP signer`);
  // A factory station's CA: its key is in the station's token, so it cannot certify an OCSP signer here.
  if (!caRow.key_ref) throw new HallmarkError('CA_NOT_ACTIVE', `CA ${ca} has no key online (a factory station's CA): it has no OCSP signer`);
  if (caRow.status !== 'active' || !caRow.certificate_der) throw new HallmarkError('CA_NOT_ACTIVE', `CA ${ca} is ${caRow.status}`);
  const caNotAfter = caRow.not_after ? new Date(caRow.not_after) : null;
  const caCert = parseCertificate(Buffer.from(caRow.certificate_der));

  const configured = authority.config.ocspSigners?.[ca];
  if (configured) {
    const existing = await loadConfigured(authority, ca, caRow.id, caCert, configured).catch((err: unknown) => {
      // A signer that cannot be used (key gone from the token, certificate revoked or missing) is replaced.
      if (err instanceof HallmarkError && ['KEY_NOT_FOUND', 'CERTIFICATE_NOT_FOUND', 'CA_CERT_MISMATCH'].includes(err.code)) return undefined;
      throw err;
    });
    if (existing && !needsRenewal(existing.notAfter, caNotAfter, now, options.renewWithinDays)) return existing;
  }

  const algorithm = parseKeyAlgorithm(caRow.key_algorithm);
  const keyRef = await authority.caKeys.generateKey(`hallmark-ocsp-${ca}`, algorithm);
  const signer = await authority.caKeys.signer(keyRef);
  const issued = await authority.issueForOwnKey({
    signer,
    profile: 'ocsp-signer',
    subject: `CN=${authority.config.org} ${ca} OCSP Signer,O=${authority.config.org}`,
    ca,
    actor: options.actor ?? 'ocsp-responder',
  });
  authority.config.ocspSigners = { ...(authority.config.ocspSigners ?? {}), [ca]: { keyRef, serial: issued.serial } };
  await saveHomeConfig(authority.home, authority.config);
  const parsed = parseCertificate(issued.der);
  return { ca, signer, certificate: issued.der, parsed, serial: issued.serial, notAfter: issued.notAfter, created: true };
}

async function loadConfigured(authority: Authority, ca: string, caId: number, caCert: ParsedCertificate, configured: { keyRef: Signer['ref']; serial: string }): Promise<OcspSigner> {
  const row = await authority.store.db.selectFrom('certificates').select(['der', 'status', 'not_after'])
    .where('issuer_id', '=', caId).where('serial', '=', configured.serial).executeTakeFirst();
  if (!row) throw new HallmarkError('CERTIFICATE_NOT_FOUND', `the OCSP signer certificate ${configured.serial} of CA ${ca} is not in the store`);
  if (row.status !== 'valid') throw new HallmarkError('CERTIFICATE_NOT_FOUND', `the OCSP signer certificate ${configured.serial} of CA ${ca} is ${row.status}`);
  const der = Buffer.from(row.der);
  const parsed = parseCertificate(der);
  if (!parsed.issuer.equals(caCert.subject)) throw new HallmarkError('CA_CERT_MISMATCH', `the OCSP signer certificate of CA ${ca} names another issuer`);
  const eku = parsed.extensions.get(EXT.extKeyUsage);
  if (!eku || !decodeOidSequence(eku.value, 'extKeyUsage').includes(EKU.ocspSigning)) throw new HallmarkError('CA_CERT_MISMATCH', `certificate ${configured.serial} is not an OCSP signing certificate`);
  const signer = await authority.caKeys.signer(configured.keyRef);
  if (!signer.publicKeySpki.equals(parsed.subjectPublicKeyInfo)) throw new HallmarkError('CA_CERT_MISMATCH', `the OCSP signer key of CA ${ca} does not match its certificate`);
  return { ca, signer, certificate: der, parsed, serial: configured.serial, notAfter: parsed.notAfter, created: false };
}
