# Registry: a resource name (NS or NSE) belongs to the SPIFFE ID that first
# registered it. `resource_id` is the subject of the first token on the
# registration path; `resource_path_ids_map[name]` are the path ids recorded
# when `name` was first registered (element 0: its registrant).
package nsm

default valid := false

valid if not input.resource_path_ids_map[input.resource_name]

valid if input.resource_path_ids_map[input.resource_name][0] == input.resource_id
