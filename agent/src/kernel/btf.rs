//! Just enough of the kernel's BTF (/sys/kernel/btf/vmlinux) to find where a field sits in a
//! kernel struct. The process-event programs read `task_struct` and `mm_struct` fields at
//! offsets the agent finds here and hands them in as load-time constants, so one build works
//! on every kernel version.

use std::collections::HashMap;

use anyhow::{Context as _, bail};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

struct Type {
    kind: u32,
    name: u32,
    /// The referenced type, for typedef/const/volatile/restrict/type tags.
    target: u32,
    members: Vec<Member>,
}

pub struct Btf {
    /// Index = type id (0 is void).
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    let s = b.get(at..at + 4).context("BTF data ends early")?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    pub fn from_sys_fs() -> anyhow::Result<Self> {
        let data =
            std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> anyhow::Result<Self> {
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != BTF_MAGIC {
            bail!("not little-endian BTF");
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let types_data = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .context("BTF types out of range")?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF strings out of range")?
            .to_vec();

        let mut types = vec![Type {
            kind: 0,
            name: 0,
            target: 0,
            members: Vec::new(),
        }];
        let mut at = 0;
        while at < types_data.len() {
            let name = u32_at(types_data, at)?;
            let info = u32_at(types_data, at + 4)?;
            let size_or_type = u32_at(types_data, at + 8)?;
            at += 12;
            let (vlen, kind, kflag) = (
                (info & 0xffff) as usize,
                (info >> 24) & 0x1f,
                info >> 31 == 1,
            );
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                4 | 5 => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let off = u32_at(types_data, m + 8)?;
                        members.push(Member {
                            name: u32_at(types_data, m)?,
                            ty: u32_at(types_data, m + 4)?,
                            bit_offset: if kflag { off & 0xff_ffff } else { off },
                        });
                    }
                    12 * vlen
                }
                6 | 13 => 8 * vlen,   // enum, func_proto
                15 | 19 => 12 * vlen, // datasec, enum64
                _ => 0,
            };
            at += extra;
            types.push(Type {
                kind,
                name,
                target: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && !t.members.is_empty() {
                let name = btf.string(t.name).to_string();
                btf.structs.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// Follows typedefs and qualifiers to the type itself.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.target
                }
                _ => break,
            }
        }
        id
    }

    /// Byte offset of `field` in `struct name`, looking into anonymous struct and union members.
    pub fn offset_of(&self, name: &str, field: &str) -> anyhow::Result<u32> {
        let id = *self
            .structs
            .get(name)
            .with_context(|| format!("kernel BTF has no struct {name}"))?;
        self.find(id, field, 0, 0)
            .map(|bits| bits / 8)
            .with_context(|| format!("kernel BTF: struct {name} has no field {field}"))
    }

    fn find(&self, id: u32, field: &str, base_bits: u32, depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        for m in &t.members {
            let name = self.string(m.name);
            if name == field {
                return Some(base_bits + m.bit_offset);
            }
            if name.is_empty() && depth < 8 {
                let inner = self.resolve(m.ty);
                if matches!(
                    self.types.get(inner as usize).map(|t| t.kind),
                    Some(KIND_STRUCT | KIND_UNION)
                ) && let Some(off) = self.find(inner, field, base_bits + m.bit_offset, depth + 1)
                {
                    return Some(off);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_task_struct_fields_in_this_kernel() {
        // Every Linux this agent supports has BTF; the test machine does too.
        let btf = Btf::from_sys_fs().unwrap();
        let tgid = btf.offset_of("task_struct", "tgid").unwrap();
        let pid = btf.offset_of("task_struct", "pid").unwrap();
        assert_eq!(tgid, pid + 4, "pid and tgid are adjacent pid_t fields");
        // mm_struct keeps these inside an anonymous struct on current kernels.
        let start = btf.offset_of("mm_struct", "arg_start").unwrap();
        assert_eq!(btf.offset_of("mm_struct", "arg_end").unwrap(), start + 8);
        assert!(btf.offset_of("task_struct", "no_such_field").is_err());
    }
}
